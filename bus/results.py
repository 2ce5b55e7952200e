"""What a completed task reports, per task type: `TaskStatusUpdated.result` on the wire.

The wire keeps a JSON object (`result`, unchanged since format 1); the runner builds it from
these structs (`wire`), and every reader decodes it once, where it reads it, with `result_as`:
a field of the wrong type there is treated as not reported (the reader says so), never a crash.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from exojet.bus.tools import ToolCall

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class ChoiceResult(msgspec.Struct, frozen=True, kw_only=True):
    """A further answer of a chat asked for `n` of them; its tokens are counted in the chat's."""

    index: int
    text: str = ""
    finish_reason: FinishReason = "stop"


class DownloadResult(msgspec.Struct, frozen=True, kw_only=True):
    """A DownloadModel's: what placement needs, so no supervisor has to hold the model's files."""

    model_id: str = ""
    path: str = ""
    # The model's layer count (None: its config.json has none).
    n_layers: int | None = None
    size_bytes: int = 0


class LoadResult(msgspec.Struct, frozen=True, kw_only=True):
    """A LoadModel's: the model, the layers this runner holds, the engine, how many chats it serves at
    once and what it can do with them."""

    model_id: str = ""
    n_layers: int | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    # How the weights run ("stored" or "dense") and why.
    weights: str = "stored"
    weights_reason: str = ""
    engine: str = ""
    chat_capacity: Annotated[int, msgspec.Meta(ge=1)] = 1
    # What it can do with the model beyond a plain chat (bus/capabilities.py's names; none from a
    # runner older than the field). Names, not the Literal: a newer runner's name this version does
    # not know must not make the whole result unreadable.
    capabilities: tuple[str, ...] = ()
    # Why this engine, when another crashed on this model.
    engine_reason: str | None = None


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """A ChatCompletion's: the whole text (the emitting rank's; others send none), why it ended, its counts."""

    text: str = ""
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = 0.0
    engine_seconds: float = 0.0
    # The prompt's part of engine_seconds (prefill, to the first token); the rest is decoding.
    time_to_first_token: float = 0.0
    tool_calls: tuple[ToolCall, ...] = ()
    # A chat asked for `n` answers: the others (choice 1 on); choice 0 is the fields above.
    choices: tuple[ChoiceResult, ...] = ()


Result = DownloadResult | LoadResult | ChatResult
R = TypeVar("R", DownloadResult, LoadResult, ChatResult)


def result_as(kind: type[R], result: dict[str, Any] | None) -> R | None:
    """`result` read as `kind` (None when absent or not one: a field missing or of the wrong type)."""
    if result is None:
        return None
    try:
        return msgspec.convert(result, kind)
    except msgspec.ValidationError:
        return None


def wire(result: Result) -> dict[str, Any]:
    """The JSON object a runner sends as the task's result."""
    out: dict[str, Any] = msgspec.to_builtins(result)
    return out
