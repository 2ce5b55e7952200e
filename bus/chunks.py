"""A chat's chunk on `exo.chunks.<runner_id>.<stream_id>`: written by the runner (runner/chunks.py),
read by every reader (bus/nats/chunk_order.py), one struct for both."""

from __future__ import annotations

import msgspec

from exojet.bus.logprobs import Logprobs
from exojet.bus.results import FinishReason
from exojet.bus.tools import ToolCallDelta


class Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Text `index` of a chat (from 0, each once); the last one is `done`, with no text, and says
    why the chat ended. Fields at their defaults are left out: a chat without tools, choices or
    logprobs writes the bytes it always did."""

    task_id: str
    index: int
    text: str
    done: bool = False
    finish_reason: FinishReason | None = None
    # A piece of a tool call (the chunk's text is then empty).
    tool_call: ToolCallDelta | None = None
    # The answer the text belongs to, of a chat asked for `n` (0: the first, or the only one).
    choice: int = 0
    # The text's tokens with their log-probabilities, when the chat asked for them.
    logprobs: Logprobs = ()


class ChoiceDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A chunk's text as its reader takes it when it is not plain text of the one answer: the
    answer of `n` it belongs to, the tokens that made it."""

    choice: int = 0
    text: str = ""
    logprobs: Logprobs = ()


def piece_of(chunk: Chunk) -> str | ToolCallDelta | ChoiceDelta:
    """What a (not done) chunk brings its reader: a tool call's piece, plain text, or a ChoiceDelta."""
    if chunk.tool_call is not None:
        return chunk.tool_call
    if chunk.choice == 0 and not chunk.logprobs:
        return chunk.text
    return ChoiceDelta(choice=chunk.choice, text=chunk.text, logprobs=chunk.logprobs)


def decode_chunk(data: bytes) -> Chunk:
    """The chunk in `data`; raises msgspec.DecodeError (or ValidationError) when it is none."""
    return msgspec.json.decode(data, type=Chunk)
