"""Liveness: a runner silent for too long is declared lost, by a fenced event on its own subject.

A runner shows it is alive by its heartbeats (`exo.heartbeat.<id>`, core NATS,
every second) and by every event it writes. When neither has come for
`timeout` seconds while its projected status is not final, this supervisor
writes `RunnerLost` on `exo.events.runner.<id>` with
`Nats-Expected-Last-Subject-Sequence` = the runner's last event sequence in the
projection: if the runner wrote in between, the write fails and nothing is
declared. The timeout is measured on this process's clock from the last sign of
life it saw (or from when it first saw the runner), so a supervisor that
starts, or restarts, gives every runner a full timeout first.

Silence this supervisor could not have heard is not held against anyone: after
its own reconnect to NATS, or after it was itself stalled (frozen, swapped
out: its check loop woke far too late), every runner gets a full timeout again
from then, and nothing is declared while it is disconnected.

The decisions (who is silent, the event that declares it) are pure, in
`supervisor/silence.py`: the deterministic simulation makes the same ones.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from exojet.bus import subjects
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client, connection
from exojet.bus.replies import RunnerConnection
from exojet.projections.state import ClusterState
from exojet.supervisor.projector import Projector
from exojet.supervisor.silence import SilenceWatch, Silent, lost_event

DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0


class Liveness:
    """Turns missing heartbeats into `RunnerLost` events (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        projector: Projector,
        supervisor_id: str,
        timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.nc = nc
        self.js = js
        self.projector = projector
        self.supervisor_id = supervisor_id
        self.timeout = timeout
        # Who was heard when, on this process's monotonic clock (the decisions are pure).
        self.watch = SilenceWatch(timeout)
        # runner id -> its connection to NATS as its last heartbeat told (outages, last outage).
        self.connections: dict[str, RunnerConnection] = {}
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.log = logger.bind(supervisor_id=supervisor_id)

    async def start(self) -> None:
        """Listen to heartbeats and runner events; check every fraction of the timeout."""
        self._sub = await self.nc.subscribe(subjects.HEARTBEATS, cb=self._on_heartbeat)
        self.projector.listeners.append(self._on_applied)
        connection.watch(self.nc).on_reconnect(self.grace)
        self._task = asyncio.create_task(self._loop(), name="liveness")

    def grace(self) -> None:
        """Give every runner a full timeout from now: the gap was ours, not theirs."""
        self.watch.grace(time.monotonic())
        self.log.info(f"every runner gets {self.timeout:g} s of grace (this supervisor could not hear them)")

    async def stop(self) -> None:
        connection.watch(self.nc).remove_listener(self.grace)
        if self._on_applied in self.projector.listeners:
            self.projector.listeners.remove(self._on_applied)
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _on_heartbeat(self, msg: Msg) -> None:
        runner_id = subjects.runner_of(msg.subject)
        if runner_id is not None:
            self.watch.heard(runner_id, time.monotonic())
            try:
                beat = msgspec.json.decode(msg.data, type=RunnerConnection)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return  # a stranger's heartbeat still shows life; it just tells nothing more
            if beat.outages is not None:
                self.connections[runner_id] = beat

    def _on_applied(self, state: ClusterState, env: Envelope) -> None:
        self.watch.heard_on(env.subject, time.monotonic())

    async def _loop(self) -> None:
        period = self.timeout / 5  # check period, a fraction of the timeout
        woke = time.monotonic()
        while True:
            await asyncio.sleep(period)
            slept, woke = time.monotonic() - woke, time.monotonic()
            if self.watch.stalled(slept, period):
                self.log.warning(f"this supervisor was stalled for {slept:.1f} s")
                self.grace()
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("liveness check failed; checking again next period")

    async def check_once(self) -> list[str]:
        """Declare lost every silent runner; returns the ids declared."""
        if not self.nc.is_connected:
            return []
        declared = []
        for silent in self.watch.silent(self.projector.state, time.monotonic()):
            if await self._declare(silent):
                self.watch.declared(silent)
                declared.append(silent.runner_id)
        return declared

    async def _declare(self, silent: Silent) -> bool:
        log = self.log.bind(runner_id=silent.runner_id, incarnation=silent.incarnation, seq=silent.last_event_seq)
        event = lost_event(silent, self.timeout, self.supervisor_id, time.time())
        try:
            ack = await client.publish(
                self.js,
                subjects.runner_events_subject(silent.runner_id),
                event,
                msg_id=event.event_id,
                expected_last_subject_seq=silent.last_event_seq,
            )
        except client.WrongLastSequence:
            # It wrote since our view: alive after all (its event resets the clock when folded).
            log.info("not declaring lost: the runner wrote since")
            return False
        log.bind(lost_seq=ack.seq).warning(f"declared lost: {event.reason}")
        return True
