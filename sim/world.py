"""The simulated world: the server, the network between it and every process, and the faults.

Each `step()` gathers everything that may happen next (a request reaching the
server, a reply reaching its fiber, a supervisor folding one more message, a
runner getting its next task, a condition someone waits for coming true), and
picks one with the seed's random source, or fires the next timer instead
(moving sim time on). So the order of everything, and every fault, is the
seed's choice:

- a publish may be lost on the way, delayed (it then lands later, after
  whatever was published meanwhile, even after a RunnerLost), answered with an
  error (not stored), or stored with its reply lost (the publisher times out);
- a task acknowledgement may be lost (the task is redelivered after ack_wait);
- heartbeats may be lost;
- while faults are on, a process may crash (restarted a little later, holding
  nothing but what the log and its disk hold), freeze, or be cut off from NATS.

Every message the server stores is also folded at once into `truth`, the
projection of the whole log, and checked (`sim/invariants.py`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from exojet.bus.nats.client import PUBLISH_TIMEOUT_S, WrongLastSequence
from exojet.bus.nats.connection import FIRST_BACKOFF_S, MAX_BACKOFF_S
from exojet.projections.apply import apply
from exojet.projections.state import ClusterState
from exojet.sim import invariants
from exojet.sim.jetstream import SimStream
from exojet.sim.kernel import (
    Actor,
    Clock,
    Effect,
    Fiber,
    FiberBody,
    LastOn,
    NextTask,
    Publish,
    Sleep,
    Transient,
    Until,
)

# How often, of the steps where something else could happen, a timer fires first.
TIMER_FIRST = 0.1


@dataclass(frozen=True)
class Faults:
    """How often each fault happens in one run (drawn from the seed)."""

    lose_request: float = 0.0
    lose_reply: float = 0.0
    delay: float = 0.0
    error: float = 0.0
    lose_ack: float = 0.0
    lose_heartbeat: float = 0.0
    # Per step, while faults are on: a process crashes, freezes, or is cut off.
    crash: float = 0.0
    freeze: float = 0.0
    cut: float = 0.0

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        """From calm to stormy: each kind on or off, at a rate of its own."""

        def rate(top: float) -> float:
            return rng.uniform(0, top) if rng.random() < 0.6 else 0.0

        return cls(
            lose_request=rate(0.05),
            lose_reply=rate(0.05),
            delay=rate(0.1),
            error=rate(0.05),
            lose_ack=rate(0.1),
            lose_heartbeat=rate(0.2),
            crash=rate(0.004),
            freeze=rate(0.004),
            cut=rate(0.004),
        )


@dataclass(eq=False)
class Request:
    fiber: Fiber
    token: int
    effect: Publish | LastOn
    ready_at: float


@dataclass(eq=False)
class Reply:
    fiber: Fiber
    token: int
    value: Any = None
    error: Exception | None = None


@dataclass
class Trace:
    """What happened, step by step, for a person reading a failed seed."""

    lines: list[tuple[float, str, str]] = field(default_factory=list)

    def say(self, now: float, who: str, what: str) -> None:
        self.lines.append((now, who, what))

    def render(self, last: int | None = None) -> str:
        lines = self.lines if last is None else self.lines[-last:]
        return "\n".join(f"{now:9.3f}  {who:<8} {what}" for now, who, what in lines)


class Violation(Exception):
    """An invariant does not hold."""


class World:
    """The server, the network, the clock and the processes of one seed."""

    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.faulty = True
        self.clock = Clock()
        self.stream = SimStream()
        self.trace = Trace()
        self.truth = ClusterState()
        self.requests: list[Request] = []
        self.replies: list[Reply] = []
        # Fibers waiting on an Until (a dict: in the order they began to wait).
        self.waiting: dict[Fiber, None] = {}
        self.actors: list[Actor] = []
        # Extra choices each step (supervisors folding, runners pulling), from their owners.
        self.offers: list[Callable[[list[Callable[[], None]]], None]] = []
        self.snapshot: bytes | None = None
        self.counts: Counter[str] = Counter()
        self.steps = 0

    @property
    def now(self) -> float:
        return self.clock.now

    def say(self, who: str, what: str, kind: str | None = None) -> None:
        """Trace a step; `kind` also counts it (faults and the recoveries they cause)."""
        self.trace.say(self.clock.now, who, what)
        if kind is not None:
            self.counts[kind] += 1

    def chance(self, p: float) -> bool:
        return self.faulty and p > 0 and self.rng.random() < p

    def backoff(self, attempt: int) -> float:
        """bus/nats/connection.py's retry delay, jittered by the seed."""
        return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** min(attempt, 10)) * self.rng.uniform(0.8, 1.0)

    def until_done(self, effect: Publish | LastOn) -> Generator[Effect, Any, Any]:
        """`client.until_done`: the effect, tried again with backoff for as long as NATS does not answer."""
        attempt = 0
        while True:
            try:
                return (yield effect)
            except Transient:
                yield Sleep(self.backoff(attempt))
                attempt += 1

    # Fibers ---------------------------------------------------------------

    def spawn(self, actor: Actor, name: str, body: FiberBody) -> Fiber:
        fiber = Fiber(actor, name, body)
        actor.fibers.append(fiber)
        self.resume(fiber, fiber.token)
        return fiber

    def kill(self, actor: Actor) -> None:
        """The process is gone: its fibers never run again (what it sent is still on the wire)."""
        actor.alive = False
        for fiber in actor.fibers:
            fiber.dead = True
            self.waiting.pop(fiber, None)
        actor.fibers = []

    def resume(self, fiber: Fiber, token: int, value: Any = None, error: Exception | None = None) -> None:
        if fiber.dead or fiber.token != token:
            return  # a wake-up for a wait that already ended
        if fiber.actor.paused_until > self.clock.now:
            self.clock.at(fiber.actor.paused_until, lambda: self.resume(fiber, token, value, error))
            return
        fiber.token += 1
        fiber.waiting = None
        self.waiting.pop(fiber, None)
        try:
            effect = fiber.body.throw(error) if error is not None else fiber.body.send(value)
        except StopIteration:
            fiber.dead = True
            fiber.actor.fibers.remove(fiber)
            return
        self._wait(fiber, effect)

    def _wait(self, fiber: Fiber, effect: Effect) -> None:
        token = fiber.token
        fiber.waiting = effect
        if isinstance(effect, Sleep):
            self.clock.after(effect.seconds, lambda: self.resume(fiber, token))
        elif isinstance(effect, Publish | LastOn):
            if self.cut(fiber.actor) or self.chance(self.faults.lose_request):
                self.say(fiber.actor.name, f"request lost on the way: {_describe(effect)}", "request lost")
            else:
                ready = self.clock.now
                if self.chance(self.faults.delay):
                    ready += self.rng.uniform(0.5, 12.0)
                    self.say(
                        fiber.actor.name, f"request delayed until {ready:.3f}: {_describe(effect)}", "request delayed"
                    )
                self.requests.append(Request(fiber, token, effect, ready))
            self.clock.after(PUBLISH_TIMEOUT_S, lambda: self.resume(fiber, token, error=Transient("no reply in time")))
        elif isinstance(effect, Until):
            self.waiting[fiber] = None
            self.clock.after(effect.timeout, lambda: self.resume(fiber, token, False))
        else:
            assert isinstance(effect, NextTask)

    def cut(self, actor: Actor) -> bool:
        return actor.cut_until > self.clock.now

    def paused(self, actor: Actor) -> bool:
        return actor.paused_until > self.clock.now

    # The server -------------------------------------------------------------

    def _serve(self, request: Request) -> None:
        self.requests.remove(request)
        effect, who = request.effect, request.fiber.actor.name
        reply = Reply(request.fiber, request.token)
        if self.chance(self.faults.error):
            reply.error = Transient("the server answered an error (nothing stored)")
            self.say(who, f"refused by the server: {_describe(effect)}", "server error")
        elif isinstance(effect, LastOn):
            reply.value = self.stream.last_on(effect.subject)
        else:
            try:
                ack = self.stream.publish(effect.subject, effect.data, effect.msg_id, effect.expected, self.clock.now)
            except WrongLastSequence as err:
                reply.error = err
                self.say(who, f"fenced out (expected {effect.expected}): {_describe(effect)}", "fenced out")
            else:
                reply.value = ack
                if ack.duplicate:
                    self.say(who, f"duplicate of seq {ack.seq}: {_describe(effect)}", "deduplicated")
                else:
                    self._stored(who, effect)
        if request.fiber.dead:
            return
        if self.cut(request.fiber.actor) or self.chance(self.faults.lose_reply):
            self.say(who, f"reply lost: {_describe(effect)}", "reply lost")
            return
        self.replies.append(reply)

    def _stored(self, who: str, effect: Publish) -> None:
        env = self.stream.log[-1]
        self.say(
            who,
            f"stored seq {env.seq}: {_describe(effect)}",
            "RunnerLost stored" if effect.label.startswith("RunnerLost") else None,
        )
        before = self.truth.anomaly_count
        apply(self.truth, env)
        if self.truth.anomaly_count > before:
            anomaly = self.truth.anomalies[-1]
            problem = invariants.forbidden(anomaly)
            self.say("truth", f"anomaly {anomaly.kind}: {anomaly.detail}")
            if problem is not None:
                raise Violation(f"seq {env.seq}: {problem}")

    def _answer(self, reply: Reply) -> None:
        self.replies.remove(reply)
        self.resume(reply.fiber, reply.token, reply.value, reply.error)

    # Scheduling ---------------------------------------------------------------

    def step(self) -> bool:
        """Let one thing happen; False when nothing ever can again."""
        self.steps += 1
        now = self.clock.now
        options: list[Callable[[], None]] = []
        options.extend(partial(self._serve, r) for r in self.requests if r.ready_at <= now)
        options.extend(partial(self._answer, r) for r in self.replies if not self.paused(r.fiber.actor))
        for fiber in self.waiting:
            if isinstance(fiber.waiting, Until) and not self.paused(fiber.actor) and fiber.waiting.ready():
                options.append(partial(self.resume, fiber, fiber.token, True))
        for offer in self.offers:
            offer(options)
        if options and not (self.clock.pending() and self.rng.random() < TIMER_FIRST):
            self.rng.choice(options)()
            return True
        if self.clock.pending():
            self.clock.fire_next()
            return True
        return False


def _describe(effect: Publish | LastOn) -> str:
    if isinstance(effect, LastOn):
        return f"last message on {effect.subject}"
    return f"{effect.label} on {effect.subject}"
