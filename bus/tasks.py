"""Tasks: what a runner is asked to do, published on `exo.tasks.<runner_id>`.

`task_id` is optional on the wire: absent, the task's id is its stream sequence
(as a string), so `nats pub` users need not invent ids.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from exojet.bus.formats import LogMessage
from exojet.bus.sampling import Choices, LogitBias, MaxTokens, Stop, Temperature, TopLogprobs, TopP
from exojet.bus.tools import ResponseFormat, Tool, ToolCall, ToolChoice


class Shard(msgspec.Struct, frozen=True, kw_only=True):
    """A model, or a contiguous layer range of it; no layers means the whole model."""

    model_id: str
    revision: str | None = None
    start_layer: int | None = None
    end_layer: int | None = None
    n_layers: int | None = None
    device_rank: int = 0
    world_size: int = 1


class Group(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline group: `hosts[r]` is the `ip:port` that rank r listens on, `keys[r]`
    the ring key rank r's runner registered (empty: a plain hello, see `runner/ring.py`)."""

    group_id: str
    world_size: int
    rank: int
    hosts: tuple[str, ...]
    keys: tuple[str, ...] = ()


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str
    content: str
    # An assistant message's tool calls; a "tool" message answers the call `tool_call_id` names.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class _Task(LogMessage, frozen=True, kw_only=True):
    task_id: str | None = None
    # Set by the planner so the projection can tie a task to its instance.
    instance_id: str | None = None


class DownloadModel(_Task, frozen=True):
    shard: Shard


class ConnectToGroup(_Task, frozen=True):
    group: Group


class LoadModel(_Task, frozen=True):
    shard: Shard | None = None


class StartWarmup(_Task, frozen=True):
    pass


class ChatCompletion(_Task, frozen=True):
    messages: Annotated[tuple[ChatMessage, ...], msgspec.Meta(min_length=1)]
    # bus/sampling.py's fields, flat (the wire's shape).
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    n: Choices | None = None
    logit_bias: LogitBias | None = None
    # True: the one message's content is the model's input as given, no chat template.
    raw: bool = False
    # bus/tools.py's AnswerShape fields, flat.
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Chunks go to `exo.chunks.<stream_id>` when set (a routed request shared by
    # every rank of an instance), else to `exo.chunks.<task_id>`.
    stream_id: str | None = None
    # In a pipeline group only this rank publishes chunks and the result text.
    emit_rank: int = 0


class UnloadModel(_Task, frozen=True):
    """Free the model (and leave the group): back to Idle, the process stays.

    Not in the seed; it lets a deleted instance release its runners without
    ending their processes the way Shutdown does.
    """


class Shutdown(_Task, frozen=True):
    pass


Task = DownloadModel | ConnectToGroup | LoadModel | StartWarmup | ChatCompletion | UnloadModel | Shutdown


def task_type(task: Task) -> str:
    """The task's wire `type`."""
    return type(task).__struct_config__.tag  # type: ignore[return-value]
