"""Commands: intents for the supervisors, published on `exo.commands`."""

from __future__ import annotations

from typing import Annotated

import msgspec

from exojet.bus.formats import LogMessage
from exojet.bus.sampling import Choices, LogitBias, MaxTokens, Stop, Temperature, TopLogprobs, TopP
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import ResponseFormat, Tool, ToolChoice


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class _Command(LogMessage, frozen=True, kw_only=True):
    # Absent means the command's stream sequence, as for tasks.
    command_id: str | None = None


class PlaceInstance(_Command, frozen=True):
    model_id: str
    runners: tuple[str, ...] | None = None
    min_runners: Annotated[int, msgspec.Meta(ge=1)] = 1
    # The model's layer count, to split it over several runners: an override; when
    # absent, the runners' downloads report it (or a supervisor's --models-dir has it).
    n_layers: Annotated[int, msgspec.Meta(ge=1)] | None = None


class DeleteInstance(_Command, frozen=True):
    instance_id: str


class DrainRunner(_Command, frozen=True):
    """Move the runner's instances elsewhere and place nothing on it until `UndrainRunner`."""

    runner_id: str


class UndrainRunner(_Command, frozen=True):
    runner_id: str


class RouteChatCompletion(_Command, frozen=True, tag="ChatCompletion"):
    """A chat for whichever Ready instance serves `model_id` (any, if absent)."""

    messages: tuple[ChatMessage, ...]
    model_id: str | None = None
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
    # True: the one message's content is the model's input as given, no chat template
    # (OpenAI's /v1/completions, Ollama's raw generate).
    raw: bool = False
    # bus/tools.py's AnswerShape fields, flat.
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CancelChat(_Command, frozen=True):
    """Cancel a routed chat that no rank runs yet: the supervisors drop it from their queue
    for good, however late they come back (ranks already running are stopped by `CancelTask`)."""

    chat_id: str
    # Who asked and why, for people reading the log ("client disconnected", ...).
    reason: str = ""


Command = PlaceInstance | DeleteInstance | RouteChatCompletion | CancelChat | DrainRunner | UndrainRunner
