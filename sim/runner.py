"""A simulated runner: the real runner's decisions (`runner/handling.py`: its start,
registration, each task's handling, its status moves and its fenced writes, all
generators without I/O) driven with the simulated log, consumer and disk, as
`runner/task_loop.py` drives them with NATS and the engine. The work itself is a sleep
that succeeds or fails as the seed says.

What survives a crash is what survives one for real: the log, the durable task
consumer, and the models on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from exojet.bus import subjects
from exojet.bus.codec import decode_event, encode
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerEvent, RunnerLost, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.lifecycle import FAILED, IDLE
from exojet.bus.statuses import status_name
from exojet.bus.tasks import ConnectToGroup, DownloadModel, LoadModel, Task, UnloadModel, task_type
from exojet.runner import steps as runner_steps
from exojet.runner import write_chain
from exojet.runner.cancels import Cancels
from exojet.runner.engine_errors import EngineError
from exojet.runner.handling import RunnerCore
from exojet.runner.task_loop import IN_PROGRESS_EVERY_S
from exojet.runner.write_chain import Build, TwinRunning
from exojet.sim.jetstream import Delivery, SimConsumer
from exojet.sim.kernel import Actor, Effect, Fiber, LastOn, NextTask, Publish, Sleep
from exojet.sim.world import Violation, World

Body = Generator[Effect, Any, Any]
# Every simulated model's layer count.
N_LAYERS = 24
# The tasks that need the engine to hold the instance they name.
_HOLDING_TASKS = frozenset({"ConnectToGroup", "LoadModel", "StartWarmup", "ChatCompletion"})


def drive(steps: Generator[Any, Any, Any], do: Callable[[Any], Body]) -> Body:
    """`runner.steps.drive` as a fiber: each step done by the generator `do`, its answer sent
    back in, its exception thrown in (a `Violation` ends the run instead)."""
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value
        try:
            answer, error = (yield from do(step)), None
        except Violation:
            raise
        except Exception as err:  # noqa: BLE001 - handed to the generator, as the real driver does
            answer, error = None, err


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
        self.core = RunnerCore(self.runner_id, self._registration(), lambda: self.world.now, Cancels(self.runner_id))
        # The instance whose model (or group) the engine holds.
        self.holding: str | None = None
        self.declared_lost = False
        self.beating = False

    def _registration(self) -> Build:
        def build(event_id: str, incarnation: int, at: float) -> RunnerRegistered:
            return RunnerRegistered(
                event_id=event_id,
                runner_id=self.runner_id,
                incarnation=incarnation,
                at=at,
                memory_free=self.memory_free,
                address=f"10.0.0.{self.runner_id.removeprefix('r')}",
                engines=("mlx",),
                ring_key=f"ring-{self.runner_id}",
            )

        return build

    @property
    def status(self) -> str:
        return status_name(self.core.status)

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
        chain = self.core.chain
        last_seq = chain.last_seq if chain is not None else 0
        return last is not None and last.seq > last_seq and isinstance(decode_event(last.data), RunnerLost)

    # The process ----------------------------------------------------------------

    def _main(self) -> Body:
        self.world.say(self.name, "process starts")
        yield from self._drive(self.core.start(), None)
        # runner/main.py starts the heartbeat once the runner has started.
        self.beating = True
        self.declared_lost = self._lost_in_log()
        while True:
            delivery = None if self.declared_lost else (yield NextTask())
            if delivery is None:
                yield from self._drive(self.core.handle_fenced(None), None)
            else:
                env = delivery.envelope
                yield from self._drive(self.core.handle_fenced(env.seq, env.data), delivery)

    def _drive(self, steps: runner_steps.Steps[Any], delivery: Delivery | None) -> Body:
        try:
            return (yield from drive(steps, lambda step: self._step(step, delivery)))
        except TwinRunning:
            raise Violation(f"runner {self.runner_id} found a twin writing its subject") from None

    def _step(self, step: runner_steps.Step, delivery: Delivery | None) -> Body:
        """Do one step of the real runner's decisions in the simulated world."""
        match step:
            case runner_steps.Write(build=build):
                seq = yield from drive(self._chain().write(build), self._write_step)
                if self.status in (IDLE, FAILED):
                    self.holding = None
                return seq
            case write_chain.LastOn(subject=subject):
                return (yield from self.world.until_done(LastOn(subject)))
            case runner_steps.AckFloor():
                return self.consumer.ack_floor
            case runner_steps.ReadSubject(start_seq=start_seq):
                return self.world.stream.on_subject(self.subject, start_seq)
            case runner_steps.Say(text=text, kind=kind) if kind is not None:
                self.world.say(self.name, text, kind)
            case runner_steps.Refusal(task=task):
                if isinstance(task, LoadModel) and task.shard is not None and task.shard.model_id not in self.disk:
                    return ("ModelNotDownloaded", f"model {task.shard.model_id} is not downloaded")
            case runner_steps.Work(task=task):
                assert delivery is not None
                return (yield from self._work(task, delivery))
            case runner_steps.Settle():
                return True
            case runner_steps.StopEngine() | runner_steps.Forget():
                self.holding = None
            case runner_steps.Rejoined():
                self.declared_lost = False
            case runner_steps.Ack() | runner_steps.Term():
                assert delivery is not None
                self._ack(delivery.envelope.seq)
        return None

    def _chain(self) -> write_chain.WriteChain:
        assert self.core.chain is not None
        return self.core.chain

    def _write_step(self, step: write_chain.Publish | write_chain.LastOn | write_chain.Warn) -> Body:
        """A step of `WriteChain.write`: a publish or a direct get, each tried until answered."""
        match step:
            case write_chain.Publish(subject=subject, event=event, msg_id=msg_id, expected=expected):
                publish = Publish(subject, encode(event), msg_id, expected, _label(event))
                ack = yield from self.world.until_done(publish)
                return ack.seq
            case write_chain.LastOn(subject=subject):
                return (yield from self.world.until_done(LastOn(subject)))
        return None

    def _ack(self, seq: int) -> None:
        if self.world.cut(self) or self.world.chance(self.world.faults.lose_ack):
            self.world.say(self.name, f"ack of task seq {seq} lost", "task ack lost")
            return
        self.consumer.ack(seq)

    def _work(self, task: Task, delivery: Delivery) -> Body:
        """The task's work: a sleep (keeping the task in progress), then success or failure as the seed says."""
        kind = task_type(task)
        if kind in _HOLDING_TASKS and self.holding not in (None, task.instance_id):
            raise Violation(f"runner {self.runner_id} runs {task.task_id} of {task.instance_id} holding {self.holding}")
        work = self.world.rng.uniform(0.05, 4.0)
        while work > 0:
            yield Sleep(min(work, IN_PROGRESS_EVERY_S))
            work -= IN_PROGRESS_EVERY_S
            if not self.world.cut(self):
                self.consumer.in_progress(delivery.envelope.seq, self.world.now)
        if not isinstance(task, UnloadModel) and self.world.rng.random() >= self.success:
            raise EngineError("SimulatedFailure", f"{kind} failed (simulated)")
        if isinstance(task, DownloadModel):
            self.disk.add(task.shard.model_id)
            # What placement splits a group by when nobody gave a layer count (executor.py).
            return {"model_id": task.shard.model_id, "n_layers": N_LAYERS}
        if isinstance(task, LoadModel | ConnectToGroup):
            self.holding = task.instance_id
        return None


def _label(event: RunnerEvent) -> str:
    if isinstance(event, RunnerStatusUpdated):
        return f"{event.event_id} {type(event.runner_status).__struct_config__.tag}"
    if isinstance(event, TaskStatusUpdated):
        return f"{event.event_id} task {event.task_id} {event.task_status}"
    return f"{event.event_id} {type(event).__name__}"
