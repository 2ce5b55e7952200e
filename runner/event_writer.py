"""The runner's writes to its own subject: fenced, deduplicated, in order.

Every write carries `Nats-Expected-Last-Subject-Sequence` = the sequence of this
runner's previous write, so a twin process with the same id, or a runner a
supervisor already declared lost, cannot write: the check fails and the runner
learns which it is from the message that got in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger
from nats.js import JetStreamContext

from exojet.bus import client, subjects
from exojet.bus.codec import BadInput, decode_event
from exojet.bus.events import RunnerEvent, RunnerLost


class Fenced(Exception):
    """Our write was refused: someone else wrote our subject since our last write."""

    def __init__(self, lost: bool, incarnation: int, message: str) -> None:
        super().__init__(message)
        self.lost = lost
        self.incarnation = incarnation


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
                ack = await client.publish(
                    self.js, self.subject, event, msg_id=event_id, expected_last_subject_seq=self.last_seq
                )
            except client.WrongLastSequence:
                if await client.last_on_subject(self.js, self.subject) is not None:
                    raise await self._who_fenced_us() from None
                # EXO_LOG's limits removed every message of our subject (an idle runner in
                # a busy log): nobody wrote it since us, so it must still be empty.
                ack = await client.publish(self.js, self.subject, event, msg_id=event_id, expected_last_subject_seq=0)
            self.last_seq = ack.seq
            logger.bind(runner_id=self.runner_id, seq=ack.seq).debug(f"wrote {type(event).__name__}")
            return ack.seq

    async def _who_fenced_us(self) -> Fenced:
        last = await client.last_on_subject(self.js, self.subject)
        try:
            event = decode_event(last.data) if last else None
        except BadInput:
            event = None
        if isinstance(event, RunnerLost):
            return Fenced(True, event.incarnation, f"runner {self.runner_id} was declared lost: {event.reason}")
        incarnation = getattr(event, "incarnation", self.incarnation)
        return Fenced(False, incarnation, f"runner {self.runner_id} is already running (incarnation {incarnation})")
