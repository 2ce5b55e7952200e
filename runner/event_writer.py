"""The runner's writes to its own subject through JetStream: fenced, deduplicated, in order.

What to write and what a refused write means is `runner/write_chain.py`'s (pure,
driven by the simulation too); this does its steps with nats-py, one write at a
time: a publish is tried again under the same message id until stored, a direct
get until answered.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from nats.js import JetStreamContext

from exojet.bus.nats import client
from exojet.runner.steps import drive
from exojet.runner.write_chain import Build, LastOn, Publish, Warn, WriteChain


class EventWriter:
    """Writes one runner incarnation's events (its `chain`)."""

    def __init__(self, js: JetStreamContext, chain: WriteChain) -> None:
        self.js = js
        self.chain = chain
        self._lock = asyncio.Lock()

    @property
    def incarnation(self) -> int:
        return self.chain.incarnation

    @property
    def last_seq(self) -> int:
        return self.chain.last_seq

    async def write(self, build: Build) -> int:
        """Publish the event `build(event_id, incarnation, at)` makes, fenced on our previous
        write; returns its stream sequence (`Fenced` if someone else wrote in between)."""
        async with self._lock:
            seq = await drive(self.chain.write(build), self._do)
            logger.bind(runner_id=self.chain.runner_id, seq=seq).debug("wrote an event")
            return seq

    async def _do(self, step: Publish | LastOn | Warn) -> object:
        match step:
            case Publish(subject=subject, event=event, msg_id=msg_id, expected=expected):
                ack = await client.publish_until_stored(
                    self.js, subject, event, msg_id=msg_id, expected_last_subject_seq=expected
                )
                return ack.seq
            case LastOn(subject=subject):
                return await client.until_done(
                    lambda: client.last_on_subject(self.js, subject), f"read the last message of {subject}"
                )
            case Warn(seq=seq, text=text):
                logger.bind(runner_id=self.chain.runner_id, seq=seq).warning(text)
        return None
