"""How a chat samples its answer, declared once.

The routed command (`RouteChatCompletion`) and the task (`ChatCompletion`) carry these fields
flat, as the wire has always had them (msgspec cannot flatten a nested struct, nor mix two field
sets by multiple inheritance), so they spell each field with the types below; `Sampling` is the
same set as one value, which the API's request carries and `sampling_of` reads back from either
message. tests/test_sampling.py checks that every message carrying them declares exactly these.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

import msgspec

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Stop = str | tuple[str, ...]
# OpenAI's bounds: the likeliest tokens reported at each place, the answers one chat asks for.
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=8)]
# Token id -> what is added to its logit before sampling (-100 bans it, 100 all but forces it).
TokenId = Annotated[int, msgspec.Meta(ge=0)]
Bias = Annotated[float, msgspec.Meta(ge=-100, le=100)]
LogitBias = dict[TokenId, Bias]


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's sampling parameters; None: the runner's default (greedy, its answer length)."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop | None = None
    # Report each generated token's log-probability (and the `top_logprobs` likeliest at its place).
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    # Answers to generate, one sequence each in the same batch (counted as n against capacity).
    n: Choices | None = None
    logit_bias: LogitBias | None = None


GREEDY = Sampling()


class Reported(Protocol):
    """The sampling fields an engine may not implement (bus/capabilities.py reads them)."""

    @property
    def logprobs(self) -> bool | None: ...
    @property
    def top_logprobs(self) -> int | None: ...
    @property
    def n(self) -> int | None: ...
    @property
    def logit_bias(self) -> dict[int, float] | None: ...


class Sampled(Reported, Protocol):
    """A message carrying the sampling fields flat."""

    @property
    def max_tokens(self) -> int | None: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> str | tuple[str, ...] | None: ...


def sampling_of(message: Sampled) -> Sampling:
    """The sampling fields of a routed command or a task, as one value."""
    return Sampling(**{name: getattr(message, name) for name in Sampling.__struct_fields__})


def choices(message: Sampled) -> int:
    """The answers a chat asks for: the sequences it takes of a runner's chat capacity."""
    return message.n or 1


def fields(sampling: Sampling) -> dict[str, Any]:
    """`sampling` as keyword arguments of the messages that carry it flat."""
    return {name: getattr(sampling, name) for name in Sampling.__struct_fields__}
