"""The reconciler: run the planner after each applied message and on a timer, publish its plan.

At most one plan is in flight: messages that arrive while it runs set a flag
and the loop plans again at once. After publishing, the loop waits until the
projection has folded its own writes, so the next plan sees them and does not
re-send what is already on its way (the deterministic ids would make the server
drop such a resend anyway; waiting saves the round trips).

Time enters only here: a failed instance's backoff is measured on this
process's monotonic clock from when this supervisor first saw the failure, and
its end is written to the log as `InstanceRetryDue`. A restarted supervisor
starts the wait again, so a backoff is never shorter than planned. The
measuring is pure (`supervisor/retries.py`), shared with the deterministic simulation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping
from pathlib import Path

from loguru import logger
from nats.js import JetStreamContext

from exojet.bus import subjects
from exojet.bus.envelope import Envelope
from exojet.bus.events import ChatRefused
from exojet.bus.nats import client
from exojet.bus.nats.log_fold import MinSeqTimeout
from exojet.models.store import InvalidModelId, layer_count, model_dir
from exojet.projections.instances import PLACING
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import DEFAULT_CONFIG, Action, PlannerConfig, RetryWait, SendTask, WriteEvent
from exojet.supervisor.planner import plan
from exojet.supervisor.projector import Projector
from exojet.supervisor.retries import RetryTimer, retry_due_event, stamped

DEFAULT_INTERVAL_S = 1.0
# How long to wait for the projection to fold our own writes before planning anyway.
OWN_WRITES_TIMEOUT_S = 5.0


def _layers_on_disk(models_dir: Path, model_id: str) -> int | None:
    """The layer count of the model in the supervisor's own models dir (the `--models-dir` override), if there."""
    try:
        return layer_count(model_dir(models_dir, model_id))
    except InvalidModelId:
        return None


Writes = Generator[SendTask | WriteEvent, int | None, tuple[int, float]]


def plan_writes(
    state: ClusterState,
    catalog: Mapping[str, int],
    config: PlannerConfig,
    retries: RetryTimer,
    now: float,
    interval: float,
) -> Writes:
    """One reconcile without I/O: the writes of the plan, in order, each sent back its stream
    sequence (None: fenced out, which ends this plan); returns (the newest sequence written, how
    long the loop may sleep before the next timed plan). The service drives it with its publishes
    and `time.monotonic()`, the deterministic simulation with its own."""
    actions = plan(state, catalog, config)
    last_seq = 0
    sleep = interval
    retries.keep_only(actions)
    for action in actions:
        if isinstance(action, RetryWait):
            due_in = retries.due_in(action, now)
            if due_in > 0:
                sleep = min(sleep, due_in)
                continue
            seq = yield WriteEvent(retry_due_event(action))
            retries.written(action)
        else:
            seq = yield action
            if seq is None:
                break  # fenced out: the log moved on, plan again from what it says
        last_seq = max(last_seq, seq or 0)
    return last_seq, sleep


class Reconciler:
    """Drives instances and routed chats by publishing what `plan` returns."""

    def __init__(
        self,
        js: JetStreamContext,
        projector: Projector,
        supervisor_id: str,
        config: PlannerConfig = DEFAULT_CONFIG,
        models_dir: Path | None = None,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.js = js
        self.projector = projector
        self.supervisor_id = supervisor_id
        self.config = config
        self.models_dir = models_dir
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._catalog: dict[str, int] = {}
        # Backoffs, on this process's monotonic clock (the decisions are pure).
        self.retries = RetryTimer()
        self.log = logger.bind(supervisor_id=supervisor_id)

    def on_applied(self, state: ClusterState, env: Envelope) -> None:
        """Projector listener: plan again soon (coalesced with any plan already due)."""
        self._wake.set()

    def start(self) -> None:
        """Register as a projector listener and start the loop."""
        self.projector.listeners.append(self.on_applied)
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self) -> None:
        """Stop the loop (a plan being published is abandoned; re-planning completes it)."""
        if self.on_applied in self.projector.listeners:
            self.projector.listeners.remove(self.on_applied)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        timeout = 0.0
        away = False
        while True:
            try:
                # Not wait_for: on 3.11 it drops a cancel that lands as the event is set
                # (the projection wakes this loop all the time), and stop() would hang.
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                timeout = await self.reconcile_once()
                away = False
            except asyncio.CancelledError:
                raise
            except client.TRANSIENT_ERRORS as err:
                # NATS is away: said once, then quietly retried by the next plan until it is back.
                (self.log.debug if away else self.log.warning)(f"reconcile: NATS did not answer ({err!r})")
                away = True
                timeout = self.interval
            except Exception:
                # A failed publish (server restarting, timeout) is retried by the next plan.
                self.log.exception("reconcile failed; planning again in a moment")
                timeout = self.interval

    async def reconcile_once(self) -> float:
        """Plan once and publish; returns how long the loop may sleep before the next timed plan."""
        state = self.projector.state
        catalog = self._catalog_for(state)
        writes = plan_writes(state, catalog, self.config, self.retries, time.monotonic(), self.interval)
        try:
            write = next(writes)
            while True:
                write = writes.send(await self._publish(write))
        except StopIteration as done:
            # plan_writes' return value: the last sequence written and the sleep before the next plan.
            outcome: tuple[int, float] = done.value
            last_seq, sleep = outcome
        if last_seq > state.seq:
            try:
                await self.projector.wait_for(last_seq, OWN_WRITES_TIMEOUT_S)
            except MinSeqTimeout as err:
                self.log.warning(str(err))
            self._wake.set()
        return sleep

    def _catalog_for(self, state: ClusterState) -> Mapping[str, int]:
        if self.models_dir is None:
            return self._catalog
        for inst in state.instances.values():
            if inst.status == PLACING and inst.model_id not in self._catalog:
                n_layers = _layers_on_disk(self.models_dir, inst.model_id)
                if n_layers is not None:
                    self._catalog[inst.model_id] = n_layers
        return self._catalog

    async def _publish(self, action: Action) -> int | None:
        if isinstance(action, SendTask):
            task = action.task
            ack = await client.publish(self.js, subjects.task_subject(action.runner_id), task, msg_id=task.task_id)
            self.log.bind(
                task_id=task.task_id, instance_id=task.instance_id, runner_id=action.runner_id, seq=ack.seq
            ).info(f"published {type(task).__name__}" + (" (duplicate)" if ack.duplicate else ""))
            return ack.seq
        assert isinstance(action, WriteEvent)
        event = stamped(action.event, self.supervisor_id, time.time())
        try:
            ack = await client.publish(
                self.js,
                subjects.SUPERVISOR_EVENTS,
                event,
                msg_id=event.event_id,
                expected_last_subject_seq=action.fence,
            )
        except client.WrongLastSequence:
            self.log.bind(event_id=event.event_id).info("fenced out: another supervisor wrote first; re-planning")
            return None
        about = {"chat_id": event.chat_id} if isinstance(event, ChatRefused) else {"instance_id": event.instance_id}
        self.log.bind(**about, event_id=event.event_id, seq=ack.seq).info(
            f"wrote {type(event).__name__}" + (" (duplicate)" if ack.duplicate else "")
        )
        return ack.seq
