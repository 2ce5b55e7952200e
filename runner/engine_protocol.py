"""Messages and framing between the runner (parent) and its engine child process.

The child reads requests on its stdin and writes replies on its stdout. Each frame
is a 4-byte big-endian length followed by a msgpack body; every message is a frozen
msgspec Struct tagged by its class name, so both sides decode into one union.

Requests are answered in order, one at a time, except generations on an engine that
serves several at once (`ModelLoaded.chat_capacity` above 1): up to that many run side by
side, each reply tagged with its `request_id`, and the parent sends no other request
until they have ended. `ConnectGroup`, `Load`, `Warmup`, `Unload` and `Generate` each end
with exactly one terminal reply (`GroupConnected`, `ModelLoaded`, `Ok`, `Done` or
`RequestFailed`); `Generate` streams `Token` and `ToolCallChunk` replies before its terminal one, and `Load`
streams `LayersLoaded` replies (one per layer) before its own. `Cancel` is a notification
without a reply: sent during a generation it ends it early (the terminal reply is then
`Done` with finish_reason "cancelled"); sent while idle it is ignored. `Exit` ends the
child without a reply.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

from exojet.bus.capabilities import Capabilities
from exojet.bus.logprobs import Logprobs
from exojet.bus.results import ChoiceResult, FinishReason
from exojet.bus.sampling import GREEDY, Sampling
from exojet.bus.tools import ResponseFormat, Tool, ToolCall, ToolCallDelta, ToolChoice

HEADER = struct.Struct(">I")
# A frame bigger than this is a corrupted stream, not a real message: prompts and
# replies are kilobytes, so refusing early beats allocating gigabytes.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class Message(msgspec.Struct, frozen=True):
    """One chat message, as the chat template expects it."""

    role: str
    content: str
    # An assistant message's calls; a "tool" message answers the call named `tool_call_id`.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


# "auto": dense float32 where that is faster and fits (runner.mlx_cpu), else as stored.
WeightsChoice = Literal["auto", "stored", "dense"]


class Load(msgspec.Struct, tag=True, frozen=True):
    """Load a model on `engine` (runner.engine_choice): an mlx-lm folder, layers
    [start_layer, end_layer) or the whole model, on "mlx"; a GGUF file on "llamacpp"."""

    model_path: str
    start_layer: int | None = None
    end_layer: int | None = None
    weights: WeightsChoice = "auto"
    engine: str = "mlx"


class Warmup(msgspec.Struct, tag=True, frozen=True):
    """Run a short generation so the first real request does not pay for it."""


class Generate(msgspec.Struct, tag=True, frozen=True):
    """Generate a chat completion, streamed as `Token` replies then `Done`, each carrying
    the request's `request_id` (the parent numbers its generations)."""

    messages: list[Message]
    # The chat's sampling, bounds and all (bus/sampling.py: the child answers a request breaking
    # them with an InvalidRequest); a group's ranks are all given the same seed.
    sampling: Sampling = GREEDY
    # The one message's content is the prompt as given, no chat template.
    raw: bool = False
    request_id: int = 0
    # Tool calls and structured output (bus/tools.py): the engine constrains the answer to them.
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """End a generation early (no reply of its own): the one numbered `request_id`, or
    every generation under way when None."""

    request_id: int | None = None


class Unload(msgspec.Struct, tag=True, frozen=True):
    """Drop the loaded model and free its memory."""


class ConnectGroup(msgspec.Struct, tag=True, frozen=True):
    """Join a pipeline group over the MLX ring backend (once per child process).

    `hosts[r]` is the `ip:port` rank r listens on. Afterwards Load takes only the
    rank's layers and Warmup/Generate run in lockstep with the other ranks.
    """

    group_id: str
    world_size: int
    rank: int
    hosts: list[str]
    timeout_s: float = 30.0
    # This rank's nkeys seed and every rank's public key (`runner/ring_identity.py`):
    # each neighbour must prove its rank. Empty keys: a plain hello (runners older
    # than ring keys).
    seed: str = ""
    keys: list[str] = []


class Exit(msgspec.Struct, tag=True, frozen=True):
    """Leave the request loop and exit with code 0."""


class ModelLoaded(msgspec.Struct, tag=True, frozen=True):
    """The model is loaded; layers [start_layer, end_layer) are in memory."""

    n_layers: int
    start_layer: int
    end_layer: int
    model_type: str
    weight_bytes: int
    load_seconds: float
    # How the weights run ("stored" or "dense" float32) and why.
    weights: str = "stored"
    weights_reason: str = ""
    engine: str = "mlx"
    # Why this engine, when it is not the first choice (another crashed on this model).
    engine_reason: str = ""
    # Generations the engine serves at once on this model (llama.cpp's slots; MLX: 1).
    chat_capacity: int = 1
    # What it can do with the model beyond a plain chat (bus/capabilities.py).
    capabilities: Capabilities = ()


class LayersLoaded(msgspec.Struct, tag=True, frozen=True):
    """`done` of the `total` layers a Load materialises are in memory (sent after each)."""

    done: int
    total: int


class GroupConnected(msgspec.Struct, tag=True, frozen=True):
    """The ring group is up and verified."""

    rank: int
    world_size: int
    # Peers refused on the way, each named with its address and why.
    refused: list[str] = []


class Ok(msgspec.Struct, tag=True, frozen=True):
    """The request succeeded and has nothing to report."""


class Token(msgspec.Struct, tag=True, frozen=True):
    """A delta of generated text (never past a stop string) of answer `choice`, with its tokens'
    log-probabilities when the request asked for them."""

    text: str
    request_id: int = 0
    choice: int = 0
    logprobs: Logprobs = ()


class ToolCallChunk(msgspec.Struct, tag=True, frozen=True):
    """A piece of a tool call the model is making (between its `Token` replies)."""

    delta: ToolCallDelta
    request_id: int = 0


class Done(msgspec.Struct, tag=True, frozen=True):
    """The end of a generation: the whole text, the tool calls and its numbers."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float
    time_to_first_token: float
    # The engine's own time for the request, from its arrival in the child to this reply
    # (what the runner adds around it is the rest of a task's time).
    seconds: float = 0.0
    request_id: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    # The further answers of a request for `n` (choice 1 on); `completion_tokens` counts them all.
    choices: tuple[ChoiceResult, ...] = ()


class RequestFailed(msgspec.Struct, tag=True, frozen=True):
    """The request failed; the child is still serving."""

    error_type: str
    message: str
    # The generation it ends (0 for any other request).
    request_id: int = 0


Request = Load | Warmup | Generate | Cancel | Unload | ConnectGroup | Exit
Reply = ModelLoaded | LayersLoaded | GroupConnected | Ok | Token | ToolCallChunk | Done | RequestFailed

# Exit status of a child whose pipeline ring broke: it cannot be used again.
RING_BROKEN_EXIT = 3
# What the parent says of a child that exited with one of these codes.
EXIT_CODES = {RING_BROKEN_EXIT: "pipeline peer lost"}

TERMINAL_REPLIES = (ModelLoaded, GroupConnected, Ok, Done, RequestFailed)

_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode_frame(message: Request | Reply) -> bytes:
    """The bytes of one frame: length header then msgpack body."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a frame header, refusing absurd sizes."""
    length: int = HEADER.unpack(header)[0]
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"engine frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length
