"""A simulated supervisor: the real fold, planner, retry timer and liveness decisions,
driven the way `supervisor/projector.py`, `reconciler.py` and `liveness.py` drive them.

It folds the log one message per step the world gives it (so supervisors read
at their own lags), stores snapshots as the projector does, and starts from the
newest snapshot (or from nothing) after a crash, then catches up before it
plans or declares anyone lost, as the real one does.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.nats.client import WrongLastSequence
from exojet.projections.apply import apply
from exojet.projections.snapshot import dump_snapshot, load_snapshot
from exojet.projections.state import ClusterState
from exojet.sim.kernel import Actor, Effect, Publish, Sleep, Transient, Until
from exojet.sim.world import World
from exojet.supervisor.actions import PlannerConfig, SendTask, WriteEvent
from exojet.supervisor.liveness import DEFAULT_HEARTBEAT_TIMEOUT_S
from exojet.supervisor.reconciler import DEFAULT_INTERVAL_S, OWN_WRITES_TIMEOUT_S, plan_writes
from exojet.supervisor.retries import RetryTimer, stamped
from exojet.supervisor.silence import SilenceWatch, Silent, lost_event

Body = Generator[Effect, Any, Any]
# Far more often than the real default (10 000), so restarts from snapshots happen.
SNAPSHOT_EVERY = 25


class SimSupervisor(Actor):
    def __init__(self, world: World, supervisor_id: str, config: PlannerConfig, catalog: Mapping[str, int]) -> None:
        super().__init__(supervisor_id)
        self.world = world
        self.config = config
        self.catalog = catalog
        # How eagerly it folds: supervisors read the log at different lags.
        self.speed = world.rng.uniform(0.2, 1.0)
        self.state = ClusterState()
        self.watch = SilenceWatch(DEFAULT_HEARTBEAT_TIMEOUT_S)
        self.retries = RetryTimer()
        self.wake = False
        self.caught_up = False
        self._since_snapshot = 0
        world.offers.append(self._offer)

    def start(self) -> None:
        """A (re)start: the newest snapshot if the seed says so, then catch up, then work."""
        self.alive = True
        snapshot = self.world.snapshot
        if snapshot is not None and self.world.rng.random() < 0.7:
            self.state = load_snapshot(snapshot)
        else:
            self.state = ClusterState()
        self.world.say(self.name, f"process starts from seq {self.state.seq}")
        self.watch = SilenceWatch(DEFAULT_HEARTBEAT_TIMEOUT_S)
        self.retries = RetryTimer()
        self.wake = False
        self.caught_up = False
        self._since_snapshot = 0
        self.world.spawn(self, "start", self._start())

    def can_fold(self) -> bool:
        """Whether this step may fold one more message: following live, each supervisor at its own
        pace (its lag); catching up after a start, as fast as the log can be read."""
        world = self.world
        return (
            self.alive
            and not world.paused(self)
            and not world.cut(self)
            and self.state.seq < world.stream.last_seq
            and (not self.caught_up or world.rng.random() < self.speed)
        )

    def _offer(self, options: list[Any]) -> None:
        if self.can_fold():
            options.append(self._fold_one)

    def _fold_one(self) -> None:
        env = self.world.stream.log[self.state.seq]
        apply(self.state, env)
        self.watch.heard_on(env.subject, self.world.now)
        self.wake = True
        self._since_snapshot += 1
        if self._since_snapshot >= SNAPSHOT_EVERY:
            self._since_snapshot = 0
            # The KV bucket keeps the newest write, whoever's: it may be older than the one it replaces.
            self.world.snapshot = dump_snapshot(self.state)

    def heard(self, runner_id: str) -> None:
        """A heartbeat reached this process."""
        self.watch.heard(runner_id, self.world.now)

    def reconnected(self) -> None:
        """`Liveness.grace` on reconnect: silence we could not hear is not held against anyone."""
        self.watch.grace(self.world.now)

    def _start(self) -> Body:
        end = self.world.stream.last_seq
        while not (yield Until(lambda: self.state.seq >= end, 600.0)):
            pass
        self.caught_up = True
        self.world.say(self.name, f"caught up at seq {self.state.seq}: reconciling, watching liveness")
        self.world.spawn(self, "liveness", self._liveness())
        self.world.spawn(self, "reconciler", self._reconciler())

    # Liveness ---------------------------------------------------------------------

    def _liveness(self) -> Body:
        period = DEFAULT_HEARTBEAT_TIMEOUT_S / 5
        woke = self.world.now
        while True:
            yield Sleep(period)
            slept, woke = self.world.now - woke, self.world.now
            if self.watch.stalled(slept, period):
                self.world.say(self.name, f"was stalled for {slept:.1f} s: grace")
                self.watch.grace(self.world.now)
            if self.world.cut(self):
                continue
            try:
                for silent in self.watch.silent(self.state, self.world.now):
                    if (yield from self._declare(silent)):
                        self.watch.declared(silent)
            except Transient:
                continue  # checked again next period

    def _declare(self, silent: Silent) -> Body:
        event = lost_event(silent, DEFAULT_HEARTBEAT_TIMEOUT_S, self.name, self.world.now)
        publish = Publish(
            subjects.runner_events_subject(silent.runner_id),
            encode(event),
            event.event_id,
            silent.last_event_seq,
            f"RunnerLost {event.event_id} ({event.reason})",
        )
        try:
            yield publish
        except WrongLastSequence:
            return False
        return True

    # Reconciler -------------------------------------------------------------------

    def _reconciler(self) -> Body:
        timeout = 0.0
        while True:
            yield Until(lambda: self.wake, timeout)
            self.wake = False
            try:
                timeout = yield from self._reconcile_once()
            except Transient:
                timeout = DEFAULT_INTERVAL_S

    def _reconcile_once(self) -> Body:
        """`Reconciler.reconcile_once`: the same `plan_writes`, driven by simulated publishes."""
        state = self.state
        writes = plan_writes(state, self.catalog, self.config, self.retries, self.world.now, DEFAULT_INTERVAL_S)
        try:
            write = next(writes)
            while True:
                write = writes.send((yield from self._publish(write)))
        except StopIteration as done:
            last_seq, sleep = done.value
        if last_seq > state.seq:
            yield Until(lambda: self.state.seq >= last_seq, OWN_WRITES_TIMEOUT_S)
            self.wake = True
        return sleep

    def _publish(self, action: SendTask | WriteEvent) -> Body:
        if isinstance(action, SendTask):
            task = action.task
            ack = yield Publish(
                subjects.task_subject(action.runner_id),
                encode(task),
                task.task_id,
                None,
                f"{type(task).__name__} {task.task_id}",
            )
            return ack.seq
        event = stamped(action.event, self.name, self.world.now)
        try:
            ack = yield Publish(
                subjects.SUPERVISOR_EVENTS, encode(event), event.event_id, action.fence, type(event).__name__
            )
        except WrongLastSequence:
            return None
        return ack.seq
