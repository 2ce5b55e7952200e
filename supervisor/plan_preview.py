"""What this version's planner would have decided differently on a recorded log (`exojet replay
--plan`): an upgrade's preview.

The log is folded as it was written; after each message this planner plans from the state so
far. Decisions are compared as sets, each named by its id (a
task's id, a supervisor event's id), ignoring when they came: one the planner proposes at any step
that the log never holds, one the log holds that the planner never proposed before it, and a task
both sent to different runners. Liveness (`RunnerLost`, from heartbeats the log does not store) is
out of scope; a retry's wait is timing, so only its due event counts. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import SupervisorEvent
from exojet.bus.tasks import Task, task_type
from exojet.projections.apply import apply
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import DEFAULT_CONFIG, Action, PlannerConfig, RetryWait, SendTask, WriteEvent
from exojet.supervisor.planner import EMPTY_CATALOG, plan
from exojet.supervisor.retries import retry_due_event


class Decision(msgspec.Struct, frozen=True):
    """One decision: `key` names it across the log and the plan; `runner_id` for a task."""

    key: str
    words: str
    runner_id: str | None = None


class Difference(msgspec.Struct, frozen=True):
    seq: int
    words: str


def _task_decision(runner_id: str, task: Task) -> Decision:
    return Decision(f"task {task.task_id}", f"send {task_type(task)} {task.task_id} to {runner_id}", runner_id)


def _event_decision(event: SupervisorEvent) -> Decision:
    about = getattr(event, "instance_id", None) or getattr(event, "chat_id", "")
    return Decision(f"event {event.event_id}", f"write {type(event).__name__} for {about} ({event.event_id})")


def logged_decision(env: Envelope) -> Decision | None:
    """The planner's decision `env` holds, if it is one: a task a supervisor published for an
    instance (a task without one is a person's), or an event of the planner's kinds."""
    runner_id = subjects.runner_of(env.subject) if env.subject.startswith(subjects.TASKS_PREFIX + ".") else None
    try:
        if runner_id is not None:
            task = decode_task(env.data)
            return _task_decision(runner_id, task) if task.instance_id is not None else None
        if env.subject == subjects.SUPERVISOR_EVENTS:
            event = decode_event(env.data)
            return _event_decision(event) if isinstance(event, SupervisorEvent) else None
    except BadInput:
        return None
    return None


def planned_decision(action: Action) -> Decision:
    match action:
        case SendTask(runner_id=runner_id, task=task):
            return _task_decision(runner_id, task)
        case WriteEvent(event=event):
            return _event_decision(event)
        case RetryWait():
            return _event_decision(retry_due_event(action))


class PlanPreview:
    """`plan_differences` fed one message at a time (a log read by callback need not be held)."""

    def __init__(self, catalog: Mapping[str, int] = EMPTY_CATALOG, config: PlannerConfig = DEFAULT_CONFIG) -> None:
        self.catalog = catalog
        self.config = config
        self.state = ClusterState()
        self.logged: dict[str, tuple[int, Decision]] = {}
        self.planned: dict[str, tuple[int, Decision]] = {}

    def feed(self, env: Envelope) -> None:
        decision = logged_decision(env)
        if decision is not None:
            self.logged.setdefault(decision.key, (env.seq, decision))
        self.state = apply(self.state, env)
        for action in plan(self.state, self.catalog, self.config):
            proposed = planned_decision(action)
            self.planned.setdefault(proposed.key, (env.seq, proposed))

    def differences(self) -> list[Difference]:
        """Every decision this planner and the log disagree on, in log order (see the module)."""
        found = [
            Difference(seq, f"this planner would {d.words}; the log never did")
            for key, (seq, d) in self.planned.items()
            if key not in self.logged
        ]
        for key, (seq, d) in self.logged.items():
            first = self.planned.get(key)
            if first is None or first[0] > seq:
                found.append(Difference(seq, f"the log did {d.words}; this planner would not have by then"))
            elif first[1].runner_id != d.runner_id:
                found.append(Difference(seq, f"the log did {d.words}; this planner would {first[1].words}"))
        return sorted(found, key=lambda d: (d.seq, d.words))


def plan_differences(
    log: Iterable[Envelope], catalog: Mapping[str, int] = EMPTY_CATALOG, config: PlannerConfig = DEFAULT_CONFIG
) -> list[Difference]:
    """Every decision this planner and the log `log` disagree on, in log order."""
    preview = PlanPreview(catalog, config)
    for env in log:
        preview.feed(env)
    return preview.differences()
