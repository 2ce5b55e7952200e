"""The simulation's kernel: one clock, one random source, fibers, and what they wait for.

A fiber is a generator that yields an effect (sleep, publish, wait for a
condition ...) and is resumed with its result, or has an exception thrown into
it, exactly where asyncio code would `await`. Nothing runs concurrently: each
step of the scheduler (`sim/world.py`) picks one thing that may happen next with
the seed's `random.Random`, so a seed replays exactly. Sim time only moves when
the scheduler fires a timer; no wall clock is read.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any


class Transient(Exception):
    """NATS did not answer in time (a lost request or reply, a server away): try again."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Publish:
    """A JetStream publish; resumes with `PubAck`, or raises `Transient` / bus.client's `WrongLastSequence`."""

    subject: str
    data: bytes
    msg_id: str | None
    expected: int | None = None
    # What it is, for the trace.
    label: str = ""


@dataclass(frozen=True, slots=True)
class LastOn:
    """A direct get of the newest message on `subject`; resumes with an Envelope or None."""

    subject: str


@dataclass(frozen=True, slots=True)
class Until:
    """Wait for `ready()` to hold, at most `timeout` seconds; resumes with whether it held."""

    ready: Callable[[], bool]
    timeout: float


@dataclass(frozen=True, slots=True)
class NextTask:
    """A runner's pull from its task consumer; resumes with a Delivery, or None when the runner
    learns it was declared lost while it waited."""


Effect = Sleep | Publish | LastOn | Until | NextTask
FiberBody = Generator[Effect, Any, None]


@dataclass(eq=False)
class Actor:
    """A simulated process: it can crash (fibers dropped), freeze, or be cut off from NATS."""

    name: str
    alive: bool = True
    paused_until: float = 0.0
    cut_until: float = 0.0
    fibers: list[Fiber] = field(default_factory=list)


@dataclass(eq=False)
class Fiber:
    actor: Actor
    name: str
    body: FiberBody
    # Bumped at every resume: a wake-up made for an older wait is ignored.
    token: int = 0
    waiting: Effect | None = None
    dead: bool = False


class Clock:
    """Sim time and its timers (fired in time order, ties in the order they were set)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._count = 0

    def at(self, when: float, fire: Callable[[], None]) -> None:
        self._count += 1
        heapq.heappush(self._timers, (max(when, self.now), self._count, fire))

    def after(self, delay: float, fire: Callable[[], None]) -> None:
        self.at(self.now + delay, fire)

    def pending(self) -> bool:
        return bool(self._timers)

    def next_at(self) -> float:
        return self._timers[0][0]

    def fire_next(self) -> None:
        when, _, fire = heapq.heappop(self._timers)
        self.now = max(self.now, when)
        fire()
