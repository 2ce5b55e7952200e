"""How a chat samples its answer, declared once.

The routed command (`RouteChatCompletion`) and the task (`ChatCompletion`) carry these fields
flat, as the wire has always had them (msgspec cannot flatten a nested struct, nor mix two field
sets by multiple inheritance), so they spell each field with the types below; `Sampling` is the
same set as one value, which the API's request carries and `sampling_of` reads back from either
message. tests/test_sampling.py checks that every message carrying them declares exactly these.
The engine protocol's `Generate` (the runner's pipe to its engine child) carries a `Sampling`,
which every engine reads through the properties below: what an unset field means is said there.
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
MAX_CHOICES = 8
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
# Token id -> what is added to its logit before sampling (-100 bans it, 100 all but forces it).
TokenId = Annotated[int, msgspec.Meta(ge=0)]
Bias = Annotated[float, msgspec.Meta(ge=-100, le=100)]
LogitBias = dict[TokenId, Bias]

# The answer length of a chat that names none (`max_tokens` absent).
DEFAULT_MAX_TOKENS = 256


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

    @property
    def answer_length(self) -> int:
        """The most tokens an answer may have: `max_tokens`, else the runner's default."""
        return self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def greedy(self) -> bool:
        """Whether each token is the likeliest (temperature 0 or unset): no randomness, no seed needed."""
        return not self.temperature

    @property
    def temperature_or_greedy(self) -> float:
        """The temperature; 0 (greedy) when unset."""
        return self.temperature or 0.0

    @property
    def top_p_or_all(self) -> float:
        """The nucleus sampled from; 1 (every token) when unset."""
        return 1.0 if self.top_p is None else self.top_p

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list, whatever form the user sent (none when unset)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def reported_top(self) -> int | None:
        """How many likeliest tokens to report beside each token's log-probability; None: report
        no log-probability (`logprobs` unset or false: `top_logprobs` alone asks for nothing)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def biases(self) -> dict[int, float]:
        """`logit_bias`; no token biased when unset."""
        return self.logit_bias or {}


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
    """A message carrying the sampling fields flat (or a `Sampling`)."""

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


def choices(message: Reported) -> int:
    """The answers a chat asks for: the sequences it takes of a runner's chat capacity."""
    return message.n or 1


def fields(sampling: Sampling) -> dict[str, Any]:
    """`sampling` as keyword arguments of the messages that carry it flat."""
    return {name: getattr(sampling, name) for name in Sampling.__struct_fields__}
