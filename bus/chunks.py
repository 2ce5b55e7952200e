"""A chat's chunk on `exo.chunks.<runner_id>.<stream_id>`: written by the runner (runner/chunks.py),
read by every reader (bus/nats/chunk_order.py), one struct for both."""

from __future__ import annotations

import msgspec

from exojet.bus.results import FinishReason
from exojet.bus.tools import ToolCallDelta


class Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Text `index` of a chat (from 0, each once); the last one is `done`, with no text, and says
    why the chat ended."""

    task_id: str
    index: int
    text: str
    done: bool = False
    finish_reason: FinishReason | None = None
    # A piece of a tool call (the chunk's text is then empty).
    tool_call: ToolCallDelta | None = None


def decode_chunk(data: bytes) -> Chunk:
    """The chunk in `data`; raises msgspec.DecodeError (or ValidationError) when it is none."""
    return msgspec.json.decode(data, type=Chunk)
