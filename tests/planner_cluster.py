"""A log played without a server, for the planner's tests and the ones beside them: `Cluster`
folds messages, turns the planner's actions into log messages (as the reconciler publishes them)
and answers tasks the way a runner does, so whole placements run purely."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from exojet.bus import subjects
from exojet.bus.capabilities import KNOWN
from exojet.bus.codec import encode
from exojet.bus.commands import PlaceInstance
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.statuses import (
    RunnerConnected,
    RunnerConnecting,
    RunnerDownloading,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerWarmingUp,
    TaskStatus,
)
from exojet.bus.tasks import (
    ChatCompletion,
    DownloadModel,
    LoadModel,
    Task,
    task_type,
)
from exojet.bus.views import InstanceView
from exojet.projections.apply import apply
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import DEFAULT_CONFIG, PlannerConfig, RetryWait, SendTask, WriteEvent
from exojet.supervisor.planner import plan

pytestmark = pytest.mark.timeout(60)


# The runner statuses each task goes through (a download returns to Idle: it precedes any group).
def _placing(c: Cluster, model: str = "local/tiny") -> InstanceView:
    c.command(PlaceInstance(model_id=model))
    return list(c.state.instances.values())[-1]


STATUSES: dict[str, tuple[RunnerStatus, ...]] = {
    "DownloadModel": (RunnerDownloading(), RunnerIdle()),
    "ConnectToGroup": (RunnerConnecting(), RunnerConnected()),
    "LoadModel": (RunnerLoading(), RunnerLoaded()),
    "StartWarmup": (RunnerWarmingUp(), RunnerReady()),
    "ChatCompletion": (RunnerRunning(), RunnerReady()),
    "UnloadModel": (RunnerIdle(),),
}


class Cluster:
    """A log and its projection, with simulated runners that complete every task."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.log: list[Envelope] = []
        # What each runner's LoadModel states it serves at once.
        self.chat_capacity = 1
        # What a runner's LoadModel states it can do (bus/capabilities.py): every capability unless
        # named here; None states no field at all, as a runner older than capabilities (v0.1.0).
        self.capabilities: dict[str, tuple[str, ...] | None] = {}
        self.ids = itertools.count()
        self.incarnations: dict[str, int] = {}
        # What a DownloadModel's result reports of the model, as runners do (None: nothing, as older runners).
        self.model_layers: int | None = None

    def put(self, subject: str, message: msgspec.Struct) -> Envelope:
        env = Envelope(seq=len(self.log) + 1, subject=subject, data=encode(message))
        self.log.append(env)
        self.state = apply(self.state, env)
        return env

    def event(self, runner_id: str, event_type: type, **fields: object) -> None:
        self.put(
            subjects.runner_events_subject(runner_id),
            event_type(
                event_id=f"{runner_id}:{next(self.ids)}",
                runner_id=runner_id,
                incarnation=self.incarnations[runner_id],
                **fields,
            ),
        )

    def status(self, runner_id: str, status: RunnerStatus) -> None:
        self.event(runner_id, RunnerStatusUpdated, runner_status=status)

    def register(
        self, runner_id: str, memory_free: int = 1000, engines: tuple[str, ...] = ("mlx",), ring_key: str = "k"
    ) -> None:
        self.incarnations[runner_id] = self.incarnations.get(runner_id, 0) + 1
        self.event(
            runner_id,
            RunnerRegistered,
            memory_free=memory_free,
            address="10.0.0.1",
            engines=engines,
            ring_key=ring_key and f"{ring_key}-{runner_id}",
        )
        self.status(runner_id, RunnerIdle())

    def command(self, command: msgspec.Struct) -> None:
        self.put(subjects.COMMANDS, command)

    def publish(self, actions: list) -> list[Task]:
        """Publish plan actions as the reconciler does (no RetryWait: that needs a clock)."""
        sent = []
        for action in actions:
            if isinstance(action, SendTask):
                self.put(subjects.task_subject(action.runner_id), action.task)
                sent.append(action.task)
            elif isinstance(action, WriteEvent):
                if action.fence is not None:
                    assert action.fence == self.state.supervisor_seq
                self.put(subjects.SUPERVISOR_EVENTS, action.event)
        return sent

    def complete(self, runner_id: str, task: Task, status: TaskStatus = TaskStatus.COMPLETE) -> None:
        self.event(runner_id, TaskStatusUpdated, task_id=task.task_id, task_status=TaskStatus.RUNNING)
        if status == TaskStatus.COMPLETE:
            for runner_status in STATUSES[task_type(task)]:
                self.status(runner_id, runner_status)
        self.event(
            runner_id,
            TaskStatusUpdated,
            task_id=task.task_id,
            task_status=status,
            result=self._result(runner_id, task),
        )

    def _result(self, runner_id: str, task: Task) -> dict[str, object] | None:
        if isinstance(task, ChatCompletion):
            return {"text": "hi"}
        if isinstance(task, DownloadModel) and self.model_layers is not None:
            return {"model_id": task.shard.model_id, "n_layers": self.model_layers, "size_bytes": 1234}
        if isinstance(task, LoadModel):
            stated = self.capabilities.get(runner_id, KNOWN)
            if stated is None:
                return {}
            return {"chat_capacity": self.chat_capacity, "capabilities": list(stated)}
        return None

    def run(
        self, catalog: dict[str, int] | None = None, config: PlannerConfig = DEFAULT_CONFIG, rounds: int = 30
    ) -> list[tuple[str, Task]]:
        """Plan, publish, answer every task; until the plan is empty. Returns (runner, task) in log order."""
        done = []
        for _ in range(rounds):
            actions = [a for a in plan(self.state, catalog or {}, config) if not isinstance(a, RetryWait)]
            if not actions:
                return done
            self.publish(actions)
            for a in actions:
                if isinstance(a, SendTask):
                    self.complete(a.runner_id, a.task)
                    done.append((a.runner_id, a.task))
        raise AssertionError("the plan never settled")


def ready_single(c: Cluster, runner: str, model: str = "local/tiny") -> str:
    """Place `model` on `runner` alone and run it to Ready; its instance id."""
    c.command(PlaceInstance(model_id=model, runners=(runner,)))
    c.run()
    instance_id = c.state.runner_instances[runner]
    assert c.state.instances[instance_id].status == "Ready"
    return instance_id
