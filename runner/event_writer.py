"""The runner's writes to its own subject: fenced, deduplicated, in order.

Every write carries `Nats-Expected-Last-Subject-Sequence` = the sequence of this
runner's previous write, so a twin process with the same id, or a runner a
supervisor already declared lost, cannot write: the check fails and the runner
learns which it is from the message that got in between.

A write NATS does not acknowledge (the server away, restarting) is tried again
under the same message id until it is. If the server stored a try but its ack
was lost, the next try fails the check against our own message: the subject's
last message then carries our event id, and the write is done, not fenced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger
from nats.js import JetStreamContext

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_event
from exojet.bus.events import RunnerEvent, RunnerLost
from exojet.bus.nats import client


class Fenced(Exception):
    """Our write was refused: someone else wrote our subject since our last write."""

    def __init__(self, lost: bool, incarnation: int, message: str, late: bool = False) -> None:
        super().__init__(message)
        self.lost = lost
        self.incarnation = incarnation
        # The write in between was an earlier incarnation's, stored late (it was still on its
        # way when that process died): no twin, the registration just has to be made again.
        self.late = late


class EventWriter:
    """Writes one runner incarnation's events; `build(event_id, incarnation, at)` makes each."""

    def __init__(self, js: JetStreamContext, runner_id: str, incarnation: int, last_seq: int) -> None:
        self.js = js
        self.runner_id = runner_id
        self.incarnation = incarnation
        self.last_seq = last_seq
        self.subject = subjects.runner_events_subject(runner_id)
        self._count = 0
        self._lock = asyncio.Lock()

    async def write(self, build: Callable[[str, int, float], RunnerEvent]) -> int:
        """Publish the event, fenced on our previous write; returns its stream sequence."""
        async with self._lock:
            self._count += 1
            event_id = f"{self.runner_id}:{self.incarnation}:{self._count}"
            event = build(event_id, self.incarnation, time.time())
            try:
                ack = await client.publish_until_stored(
                    self.js, self.subject, event, msg_id=event_id, expected_last_subject_seq=self.last_seq
                )
                seq = ack.seq
            except client.WrongLastSequence:
                seq = await self._reconcile(event, event_id)
            self.last_seq = seq
            logger.bind(runner_id=self.runner_id, seq=seq).debug(f"wrote {type(event).__name__}")
            return seq

    async def _reconcile(self, event: RunnerEvent, event_id: str) -> int:
        """After a refused write: the sequence of our own write if it is the subject's last
        (its ack was lost), the write made after an earlier one of ours that was stored when
        its caller had stopped waiting (a task cancelled mid-write), else the Fenced naming
        who wrote in between."""
        while True:
            last = await client.until_done(
                lambda: client.last_on_subject(self.js, self.subject), f"read the last message of {self.subject}"
            )
            if last is None:
                # EXO_LOG's limits removed every message of our subject (an idle runner in
                # a busy log): nobody wrote it since us, so it must still be empty.
                ack = await client.publish_until_stored(
                    self.js, self.subject, event, msg_id=event_id, expected_last_subject_seq=0
                )
                return ack.seq
            try:
                found: object = decode_event(last.data)
            except BadInput:
                found = None
            found_id = getattr(found, "event_id", None)
            if found_id == event_id:
                logger.bind(runner_id=self.runner_id, seq=last.seq).warning(
                    f"the ack of {event_id} was lost; the log has it at seq {last.seq}"
                )
                return last.seq
            if not self._earlier_own(found_id):
                raise self._fenced_by(found)
            logger.bind(runner_id=self.runner_id, seq=last.seq).warning(
                f"{found_id} was stored after its writer stopped waiting for it; writing {event_id} after it"
            )
            try:
                ack = await client.publish_until_stored(
                    self.js, self.subject, event, msg_id=event_id, expected_last_subject_seq=last.seq
                )
                return ack.seq
            except client.WrongLastSequence:
                continue  # someone wrote again meanwhile: look at who

    def _earlier_own(self, event_id: object) -> bool:
        """Whether `event_id` is one of this writer's earlier events (only this process
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
