"""A simulated runner: the runner's protocol (`runner/task_loop.py`, `registration.py`,
`event_writer.py`) step for step, its statuses decided by the lifecycle table
(`bus/lifecycle.py`), its task dedupe by the real `TaskHistory`; the work itself
is a sleep that succeeds or fails as the seed says.

What survives a crash is what survives one for real: the log, the durable task
consumer, and the models on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from exojet.bus import subjects
from exojet.bus.codec import decode_event, decode_task, encode
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerEvent, RunnerLost, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.lifecycle import FAILED, IDLE, LIFECYCLE, REGISTERED
from exojet.bus.statuses import RunnerFailed, TaskStatus, runner_status
from exojet.bus.tasks import ConnectToGroup, DownloadModel, LoadModel, task_type
from exojet.runner.task_history import TaskHistory
from exojet.sim.jetstream import Delivery, SimConsumer
from exojet.sim.kernel import Actor, Effect, Fiber, LastOn, NextTask, Publish, Sleep, Transient, WrongLastSequence
from exojet.sim.world import Violation, World

Body = Generator[Effect, Any, Any]
# Every simulated model's layer count.
N_LAYERS = 24
# runner/task_loop.py's in-progress period: a third of the consumer's ack_wait.
IN_PROGRESS_EVERY_S = 2.0
# The tasks that need the engine to hold the instance they name.
_HOLDING_TASKS = frozenset({"ConnectToGroup", "LoadModel", "StartWarmup", "ChatCompletion"})


class Fenced(Exception):
    """`runner/event_writer.py`'s: declared lost, a twin, or an earlier incarnation's late write."""

    def __init__(self, lost: bool, late: bool = False) -> None:
        super().__init__("declared lost" if lost else "a late write" if late else "a twin wrote our subject")
        self.lost = lost
        self.late = late


class SimRunner(Actor):
    def __init__(self, world: World, runner_id: str, memory_free: int, success: float) -> None:
        super().__init__(runner_id)
        self.world = world
        self.runner_id = runner_id
        self.memory_free = memory_free
        self.success = success
        self.subject = subjects.runner_events_subject(runner_id)
        self.consumer = SimConsumer(world.stream, subjects.task_subject(runner_id))
        self.disk: set[str] = set()
        self._reset()
        world.offers.append(self._offer)

    def _reset(self) -> None:
        self.history = TaskHistory()
        self.incarnation = 0
        self.last_seq = 0
        self.count = 0
        self.status = REGISTERED
        # The instance whose model (or group) the engine holds.
        self.holding: str | None = None
        self.declared_lost = False
        self.beating = False

    def start(self) -> None:
        self.alive = True
        self._reset()
        self.world.spawn(self, "main", self._main())

    # What the world may do for us ---------------------------------------------

    def _offer(self, options: list[Any]) -> None:
        fiber = self.fibers[0] if self.fibers else None
        if fiber is None or not isinstance(fiber.waiting, NextTask):
            return
        if self.world.paused(self) or self.world.cut(self):
            return
        token = fiber.token
        env = self.consumer.deliverable(self.world.now)
        if env is not None:
            options.append(lambda: self._deliver(fiber, token, env))
        if self._lost_in_log():
            options.append(lambda: self.world.resume(fiber, token, None))

    def _deliver(self, fiber: Fiber, token: int, env: Envelope) -> None:
        delivery = self.consumer.deliver(env, self.world.now)
        if delivery.deliveries > 1:
            self.world.say(self.name, f"task seq {env.seq} delivered again ({delivery.deliveries})", "redelivery")
        self.world.resume(fiber, token, delivery)

    def _lost_in_log(self) -> bool:
        """`Runner._check_lost`: the log holds a RunnerLost after our last write."""
        last = self.world.stream.last_on(self.subject)
        return last is not None and last.seq > self.last_seq and isinstance(decode_event(last.data), RunnerLost)

    # The process ----------------------------------------------------------------

    def _main(self) -> Body:
        self.world.say(self.name, "process starts")
        self.history.seq = self.consumer.ack_floor
        self._fold(self.consumer.ack_floor + 1)
        while True:
            try:
                yield from self._register(fold=True)
                for task_id, kind in list(self.history.unanswered().items()):
                    yield from self._task_status(
                        task_id, TaskStatus.FAILED, kind, "RunnerRestarted", f"runner {self.runner_id} restarted"
                    )
                break
            except Fenced as fenced:
                if not (fenced.lost or fenced.late):
                    raise Violation(f"runner {self.runner_id} found a twin writing its subject") from None
                self.world.say(self.name, f"{fenced} while starting: registering again", "registered again")
        # runner/main.py starts the heartbeat once the runner has started.
        self.beating = True
        self.declared_lost = self._lost_in_log()
        while True:
            delivery = None if self.declared_lost else (yield NextTask())
            yield from self._handle_fenced(delivery)

    def _handle_fenced(self, delivery: Delivery | None) -> Body:
        rejoin = delivery is None
        while True:
            try:
                if rejoin:
                    self.world.say(self.name, "declared lost: re-registering", "re-registered after a loss")
                    self.history.lose()
                    self.holding = None
                    yield from self._register()
                    self.declared_lost = False
                if delivery is not None:
                    yield from self._handle(delivery)
                return
            except Fenced as fenced:
                if not fenced.lost:
                    raise Violation(f"runner {self.runner_id} found a twin writing its subject") from None
                rejoin = True

    def _fold(self, start_seq: int) -> None:
        for env in self.world.stream.on_subject(self.subject, start_seq):
            self.history.apply(decode_event(env.data), env.seq)

    def _register(self, fold: bool = False) -> Body:
        """`registration.register` (folding the subject up to its fence into the history at a start)."""
        last = yield from self.world.until_done(LastOn(self.subject))
        while fold and last is not None and last.seq > self.history.seq:
            self._fold(self.history.seq + 1)
            last = yield from self.world.until_done(LastOn(self.subject))
        self.incarnation = (getattr(decode_event(last.data), "incarnation", 0) if last else 0) + 1
        self.last_seq = last.seq if last else 0
        self.count = 0
        yield from self._write(
            partial(
                RunnerRegistered,
                memory_free=self.memory_free,
                address=f"10.0.0.{self.runner_id.removeprefix('r')}",
                engines=("mlx",),
            )
        )
        self.history.registered()
        yield from self._status(REGISTERED)

    def _write(self, build: Callable[..., RunnerEvent]) -> Body:
        """`EventWriter.write`: fenced on our previous write, retried under the same id until stored."""
        self.count += 1
        event_id = f"{self.runner_id}:{self.incarnation}:{self.count}"
        event: RunnerEvent = build(
            event_id=event_id, runner_id=self.runner_id, incarnation=self.incarnation, at=self.world.now
        )
        label = _label(event)
        publish = Publish(self.subject, encode(event), event_id, self.last_seq, label)
        attempt = 0
        while True:
            try:
                ack = yield publish
                seq = ack.seq
                break
            except Transient:
                yield Sleep(self.world.backoff(attempt))
                attempt += 1
            except WrongLastSequence:
                last = yield from self.world.until_done(LastOn(self.subject))
                found = decode_event(last.data)
                if found.event_id != event_id:
                    older = getattr(found, "incarnation", self.incarnation) < self.incarnation
                    late = older and not isinstance(found, RunnerLost)
                    raise Fenced(isinstance(found, RunnerLost), late) from None
                seq = last.seq  # our own write, whose ack was lost
                break
        self.last_seq = seq
        return seq

    def _status(self, name: str, error: str | None = None) -> Body:
        status = RunnerFailed(error_message=error or "") if name == FAILED else runner_status(name)
        yield from self._write(partial(RunnerStatusUpdated, runner_status=status))
        self.status = name
        if name in (IDLE, FAILED):
            self.holding = None

    def _task_status(
        self,
        task_id: str,
        status: TaskStatus,
        kind: str | None,
        error_type: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Body:
        yield from self._write(
            partial(
                TaskStatusUpdated,
                task_id=task_id,
                task_status=status,
                task_type=kind,
                error_type=error_type,
                error_message=error,
                result=result,
            )
        )
        self.history.record(task_id, status, kind)

    def _ack(self, seq: int) -> None:
        if self.world.cut(self) or self.world.chance(self.world.faults.lose_ack):
            self.world.say(self.name, f"ack of task seq {seq} lost", "task ack lost")
            return
        self.consumer.ack(seq)

    def _handle(self, delivery: Delivery) -> Body:
        """`Runner.handle`: skip what is answered, refuse what the lifecycle refuses, else run it."""
        env = delivery.envelope
        task = decode_task(env.data)
        task_id = task.task_id or str(env.seq)
        kind = task_type(task)
        if self.history.answered(task_id):
            self.world.say(
                self.name,
                f"{task_id} already answered: skipped (delivery {delivery.deliveries})",
                "answered task skipped",
            )
            self._ack(env.seq)
            return
        row = LIFECYCLE[kind]
        refusal = None
        if not row.accepts(self.status):
            refusal = ("InvalidState", f"{kind} needs {' or '.join(row.accepting_statuses())}, runner is {self.status}")
        elif isinstance(task, LoadModel) and task.shard is not None and task.shard.model_id not in self.disk:
            refusal = ("ModelNotDownloaded", f"model {task.shard.model_id} is not downloaded")
        if refusal is not None:
            yield from self._task_status(task_id, TaskStatus.FAILED, kind, *refusal)
            self._ack(env.seq)
            return
        yield from self._task_status(task_id, TaskStatus.RUNNING, kind)
        if kind in _HOLDING_TASKS and self.holding not in (None, task.instance_id):
            raise Violation(f"runner {self.runner_id} runs {task_id} of {task.instance_id} holding {self.holding}")
        before = self.status
        if row.working is not None:
            yield from self._status(row.working)
        work = self.world.rng.uniform(0.05, 4.0)
        while work > 0:
            yield Sleep(min(work, IN_PROGRESS_EVERY_S))
            work -= IN_PROGRESS_EVERY_S
            if not self.world.cut(self):
                self.consumer.in_progress(env.seq, self.world.now)
        result = None
        if kind == "UnloadModel" or self.world.rng.random() < self.success:
            if isinstance(task, DownloadModel):
                self.disk.add(task.shard.model_id)
                # What placement splits a group by when nobody gave a layer count (executor.py).
                result = {"model_id": task.shard.model_id, "n_layers": N_LAYERS}
            elif isinstance(task, LoadModel | ConnectToGroup):
                self.holding = task.instance_id
            yield from self._status(row.succeeded(before))
            yield from self._task_status(task_id, TaskStatus.COMPLETE, kind, result=result)
        else:
            yield from self._status(row.failure, f"{kind} failed (simulated)")
            yield from self._task_status(task_id, TaskStatus.FAILED, kind, "SimulatedFailure", f"{kind} failed")
        self._ack(env.seq)


def _label(event: RunnerEvent) -> str:
    if isinstance(event, RunnerStatusUpdated):
        return f"{event.event_id} {type(event.runner_status).__struct_config__.tag}"
    if isinstance(event, TaskStatusUpdated):
        return f"{event.event_id} task {event.task_id} {event.task_status}"
    return f"{event.event_id} {type(event).__name__}"
