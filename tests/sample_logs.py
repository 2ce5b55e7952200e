"""Logs the pure tests fold, written message by message: `Log` (r1's instance inst-p1 driven
step by step) and flows of (subject, message) pairs (a runner registering, a chat sent to it)."""

from __future__ import annotations

import msgspec

from exojet.bus.codec import encode
from exojet.bus.commands import PlaceInstance
from exojet.bus.envelope import Envelope
from exojet.bus.events import InstancePlaced, Placement, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ids import step_task_id
from exojet.bus.statuses import RunnerIdle, RunnerLoading, RunnerReady, RunnerWarmingUp, TaskStatus
from exojet.bus.tasks import ChatCompletion, ChatMessage, DownloadModel, LoadModel, Shard, StartWarmup

SHARD = Shard(model_id="local/tiny")
INST = "inst-p1"
RUNNER = "exo.events.runner.r1"
SUP = "exo.events.supervisor"
HI = (ChatMessage("user", "hi"),)
Flow = list[tuple[str, msgspec.Struct | bytes]]


class Log:
    """A log written message by message, seq from 1."""

    def __init__(self) -> None:
        self.envs: list[Envelope] = []
        self._ids = 0

    def add(self, subject: str, message: msgspec.Struct | bytes) -> None:
        data = message if isinstance(message, bytes) else encode(message)
        self.envs.append(Envelope(seq=len(self.envs) + 1, subject=subject, data=data, time=1000.0 + len(self.envs)))

    def eid(self) -> str:
        self._ids += 1
        return f"e{self._ids}"

    def status(self, status: msgspec.Struct) -> None:
        self.add(RUNNER, RunnerStatusUpdated(event_id=self.eid(), runner_id="r1", incarnation=1, runner_status=status))

    def task(self, task_id: str, status: TaskStatus, **extra: str) -> None:
        self.add(
            RUNNER,
            TaskStatusUpdated(
                event_id=self.eid(), runner_id="r1", incarnation=1, task_id=task_id, task_status=status, **extra
            ),
        )

    def step(self, step: str, status: TaskStatus) -> None:
        self.task(step_task_id(INST, 1, step, "r1"), status)


def placed_until_loading() -> Log:
    """r1 registers, inst-p1 is placed on it, downloads, and starts loading."""
    log = Log()
    log.add(RUNNER, RunnerRegistered(event_id=log.eid(), runner_id="r1", incarnation=1, host="box", pid=7))
    log.status(RunnerIdle())
    log.add("exo.commands", PlaceInstance(command_id="p1", model_id="local/tiny", runners=("r1",)))
    placement = Placement(runner_id="r1", shard=SHARD, incarnation=1)
    log.add(
        SUP,
        InstancePlaced(event_id=log.eid(), instance_id=INST, model_id="local/tiny", placements=(placement,), attempt=1),
    )
    log.add(
        "exo.tasks.r1", DownloadModel(task_id=step_task_id(INST, 1, "download", "r1"), instance_id=INST, shard=SHARD)
    )
    log.step("download", TaskStatus.RUNNING)
    log.step("download", TaskStatus.COMPLETE)
    log.add("exo.tasks.r1", LoadModel(task_id=step_task_id(INST, 1, "load", "r1"), instance_id=INST, shard=SHARD))
    log.step("load", TaskStatus.RUNNING)
    log.status(RunnerLoading())
    return log


def ready_log() -> Log:
    log = placed_until_loading()
    log.step("load", TaskStatus.COMPLETE)
    log.add("exo.tasks.r1", StartWarmup(task_id=step_task_id(INST, 1, "warmup", "r1"), instance_id=INST))
    log.step("warmup", TaskStatus.RUNNING)
    log.status(RunnerWarmingUp())
    log.step("warmup", TaskStatus.COMPLETE)
    log.status(RunnerReady())
    return log


def task_status(runner: str, n: str, task_id: str, status: TaskStatus) -> TaskStatusUpdated:
    return TaskStatusUpdated(
        event_id=f"{runner}:{n}:{task_id}:{status}",
        runner_id=runner,
        incarnation=1,
        task_id=task_id,
        task_status=status,
    )


def registered(runner: str) -> Flow:
    ev = f"exo.events.runner.{runner}"
    return [
        (ev, RunnerRegistered(event_id=f"{runner}:reg", runner_id=runner, incarnation=1, host="h", pid=1)),
        (
            ev,
            RunnerStatusUpdated(event_id=f"{runner}:idle", runner_id=runner, incarnation=1, runner_status=RunnerIdle()),
        ),
    ]


def direct_chat(runner: str, k: int, terminal: TaskStatus) -> Flow:
    """A chat sent straight to a runner: published, Running, then terminal."""
    task_id = f"t{runner}{k}"
    ev = f"exo.events.runner.{runner}"
    return [
        (f"exo.tasks.{runner}", ChatCompletion(task_id=task_id, messages=HI)),
        (ev, task_status(runner, "1", task_id, TaskStatus.RUNNING)),
        (ev, task_status(runner, "1", task_id, terminal)),
    ]
