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


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's sampling parameters; None: the runner's default (greedy, its answer length)."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop | None = None


GREEDY = Sampling()


class Sampled(Protocol):
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


def fields(sampling: Sampling) -> dict[str, Any]:
    """`sampling` as keyword arguments of the messages that carry it flat."""
    return {name: getattr(sampling, name) for name in Sampling.__struct_fields__}
