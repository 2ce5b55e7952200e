"""One runner incarnation's chain of fenced writes, decided without I/O.

Every write carries `Nats-Expected-Last-Subject-Sequence` = the sequence of this
runner's previous write, so a twin process with the same id, or a runner a
supervisor already declared lost, cannot write: the check fails and the runner
learns which it is from the message that got in between.

A write NATS does not acknowledge (the server away, restarting) is tried again
under the same message id until it is (the driver's `Publish`). If the server
stored a try but its ack was lost, the next try fails the check against our own
message: the subject's last message then carries our event id, and the write is
done, not fenced.

`WriteChain.write` is a generator of `Publish` and `LastOn`: `runner/event_writer.py`
drives it with JetStream, `sim/runner.py` with the simulated one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_event
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerEvent, RunnerLost
from exojet.bus.nats.client import WrongLastSequence

# (event_id, incarnation, at) -> the event to write.
Build = Callable[[str, int, float], RunnerEvent]


class Fenced(Exception):
    """Our write was refused: someone else wrote our subject since our last write."""

    def __init__(self, lost: bool, incarnation: int, message: str, late: bool = False) -> None:
        super().__init__(message)
        self.lost = lost
        self.incarnation = incarnation
        # The write in between was an earlier incarnation's, stored late (it was still on its
        # way when that process died): no twin, the registration just has to be made again.
        self.late = late


class TwinRunning(Exception):
    """Another live process holds this runner id."""


@dataclass(frozen=True, slots=True)
class Publish:
    """Store `event` on `subject` under `msg_id`, fenced on `expected`, tried again until stored;
    resumes with its stream sequence, or raises `WrongLastSequence`."""

    subject: str
    event: RunnerEvent
    msg_id: str
    expected: int


@dataclass(frozen=True, slots=True)
class LastOn:
    """The newest message on `subject` (a direct get, tried again until answered); resumes with
    an Envelope or None."""

    subject: str


@dataclass(frozen=True, slots=True)
class Warn:
    """Something a person reading the runner's log should know (the driver logs it at `seq`)."""

    seq: int
    text: str


Writes = Generator[Publish | LastOn | Warn, Any, int]


def decoded(env: Envelope | None) -> object:
    """The event in `env`, or None (no message, or not an event)."""
    if env is None:
        return None
    try:
        return decode_event(env.data)
    except BadInput:
        return None


class WriteChain:
    """Writes one runner incarnation's events, each fenced on the one before."""

    def __init__(self, runner_id: str, incarnation: int, last_seq: int, now: Callable[[], float]) -> None:
        self.runner_id = runner_id
        self.incarnation = incarnation
        self.last_seq = last_seq
        self.subject = subjects.runner_events_subject(runner_id)
        # The clock the events' `at` is read from (for people only).
        self.now = now
        self._count = 0

    def write(self, build: Build) -> Writes:
        """Publish the event, fenced on our previous write; returns its stream sequence."""
        self._count += 1
        event_id = f"{self.runner_id}:{self.incarnation}:{self._count}"
        event = build(event_id, self.incarnation, self.now())
        try:
            seq: int = yield Publish(self.subject, event, event_id, self.last_seq)
        except WrongLastSequence:
            seq = yield from self._reconcile(event, event_id)
        self.last_seq = seq
        return seq

    def _reconcile(self, event: RunnerEvent, event_id: str) -> Writes:
        """After a refused write: the sequence of our own write if it is the subject's last
        (its ack was lost), the write made after an earlier one of ours that was stored when
        its caller had stopped waiting (a task cancelled mid-write), else the Fenced naming
        who wrote in between."""
        while True:
            last = yield LastOn(self.subject)
            if last is None:
                # EXO_LOG's limits removed every message of our subject (an idle runner in
                # a busy log): nobody wrote it since us, so it must still be empty.
                seq: int = yield Publish(self.subject, event, event_id, 0)
                return seq
            found = decoded(last)
            found_id = getattr(found, "event_id", None)
            if found_id == event_id:
                yield Warn(last.seq, f"the ack of {event_id} was lost; the log has it at seq {last.seq}")
                return int(last.seq)
            if not self._earlier_own(found_id):
                raise self._fenced_by(found)
            late = f"{found_id} was stored after its writer stopped waiting for it; writing {event_id} after it"
            yield Warn(last.seq, late)
            try:
                seq = yield Publish(self.subject, event, event_id, last.seq)
                return seq
            except WrongLastSequence:
                continue  # someone wrote again meanwhile: look at who

    def _earlier_own(self, event_id: object) -> bool:
        """Whether `event_id` is one of this chain's earlier events (only this process
        writes under its incarnation: a twin registers a new one)."""
        prefix = f"{self.runner_id}:{self.incarnation}:"
        if not isinstance(event_id, str) or not event_id.startswith(prefix):
            return False
        count = event_id[len(prefix) :]
        return count.isdigit() and int(count) < self._count

    def _fenced_by(self, event: object) -> Fenced:
        if isinstance(event, RunnerLost):
            return Fenced(True, event.incarnation, f"runner {self.runner_id} was declared lost: {event.reason}")
        incarnation = getattr(event, "incarnation", self.incarnation)
        if incarnation < self.incarnation:
            message = f"a write of runner {self.runner_id}'s incarnation {incarnation} landed late"
            return Fenced(False, incarnation, message, late=True)
        return Fenced(False, incarnation, f"runner {self.runner_id} is already running (incarnation {incarnation})")
