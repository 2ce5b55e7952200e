"""JetStream as exojet relies on it, and nothing more: one stream, one total order.

`SimStream` stores a publish or refuses it the way nats-server does: a message
id seen within the duplicate window is acknowledged again with its first
sequence (checked first), then `Nats-Expected-Last-Subject-Sequence` is
checked. `SimConsumer` is a runner's durable pull consumer with the real
configuration (`bus/nats/stream_setup.py`): explicit acks, one unacknowledged message at a
time, redelivery after `ack_wait`, at most `max_deliver` deliveries.

What can go wrong on the way (a lost request or reply, a delay, an error
answer) is the network's doing, in `sim/world.py`; the server itself never
loses what it stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from exojet.bus import streams
from exojet.bus.envelope import Envelope
from exojet.bus.nats.client import WrongLastSequence


@dataclass(frozen=True, slots=True)
class PubAck:
    seq: int
    duplicate: bool = False


class SimStream:
    """`EXO_LOG`: `log[seq - 1]` is the message at `seq`."""

    def __init__(self, duplicate_window: float = streams.DUPLICATE_WINDOW_S) -> None:
        self.log: list[Envelope] = []
        self.duplicate_window = duplicate_window
        self._last_on: dict[str, int] = {}
        self._by_subject: dict[str, list[int]] = {}
        self._ids: dict[str, tuple[int, float]] = {}

    @property
    def last_seq(self) -> int:
        return len(self.log)

    def publish(self, subject: str, data: bytes, msg_id: str | None, expected: int | None, now: float) -> PubAck:
        if msg_id is not None and (seen := self._ids.get(msg_id)) is not None and now - seen[1] < self.duplicate_window:
            return PubAck(seen[0], duplicate=True)
        if expected is not None and self._last_on.get(subject, 0) != expected:
            raise WrongLastSequence(f"{subject}: wrong last sequence: {self._last_on.get(subject, 0)}")
        seq = len(self.log) + 1
        self.log.append(Envelope(seq=seq, subject=subject, data=data, time=now))
        self._last_on[subject] = seq
        self._by_subject.setdefault(subject, []).append(seq)
        if msg_id is not None:
            self._ids[msg_id] = (seq, now)
        return PubAck(seq)

    def last_on(self, subject: str) -> Envelope | None:
        seq = self._last_on.get(subject)
        return None if seq is None else self.log[seq - 1]

    def on_subject(self, subject: str, from_seq: int) -> list[Envelope]:
        """The messages on `subject` from `from_seq` on, in order."""
        return [self.log[s - 1] for s in self._by_subject.get(subject, ()) if s >= from_seq]

    def nth_on(self, subject: str, index: int) -> Envelope | None:
        seqs = self._by_subject.get(subject, ())
        return self.log[seqs[index] - 1] if index < len(seqs) else None


@dataclass(slots=True)
class Delivery:
    envelope: Envelope
    deliveries: int


class SimConsumer:
    """A durable pull consumer on one subject (its state outlives the runner process)."""

    def __init__(
        self,
        stream: SimStream,
        subject: str,
        ack_wait: float = streams.TASK_ACK_WAIT_S,
        max_deliver: int = streams.TASK_MAX_DELIVER,
    ) -> None:
        self.stream = stream
        self.subject = subject
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        # Index (among the subject's messages) of the next one never delivered.
        self._next = 0
        # The one unacknowledged delivery (max_ack_pending = 1): [seq, deliveries, redeliver at].
        self._pending: list[float] | None = None
        # Every message at or below it was acknowledged (or given up on after max_deliver).
        self.ack_floor = 0

    @property
    def idle(self) -> bool:
        """Nothing delivered and not yet acknowledged."""
        return self._pending is None

    def deliverable(self, now: float) -> Envelope | None:
        """What a pull would get now, if anything."""
        if self._pending is not None:
            seq, deliveries, due = self._pending
            if now < due:
                return None
            if deliveries < self.max_deliver:
                return self.stream.log[int(seq) - 1]
            # Delivered max_deliver times and never acknowledged: the server moves on.
            self.ack_floor = int(seq)
            self._pending = None
        return self.stream.nth_on(self.subject, self._next)

    def deliver(self, env: Envelope, now: float) -> Delivery:
        if self._pending is not None and int(self._pending[0]) == env.seq:
            self._pending[1] += 1
            self._pending[2] = now + self.ack_wait
        else:
            self._pending = [env.seq, 1, now + self.ack_wait]
            self._next += 1
        return Delivery(env, int(self._pending[1]))

    def ack(self, seq: int) -> None:
        if self._pending is not None and int(self._pending[0]) == seq:
            self.ack_floor = seq
            self._pending = None

    def in_progress(self, seq: int, now: float) -> None:
        if self._pending is not None and int(self._pending[0]) == seq:
            self._pending[2] = now + self.ack_wait
