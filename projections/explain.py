"""`explain(log, id)`: how a task, runner, instance or routed chat got its current status.

A pure function over the log and the fold: it folds every message with `apply`,
keeps the messages that changed the target's status (or that the fold refused
while naming the target), and ends with one line naming the cause, judged from
the final state (a runner stuck mid-transition, an instance waiting on a task
whose runner died, a Ready instance behind a lost runner ...).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from exojet.bus.envelope import Envelope
from exojet.bus.ids import chat_task_id, step_task_id
from exojet.bus.lifecycle import FAILED as RUNNER_FAILED
from exojet.bus.lifecycle import READY as RUNNER_READY
from exojet.bus.lifecycle import RUNNING as RUNNER_RUNNING
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, UNREGISTERED, TaskStatus
from exojet.bus.views import InstanceView, RunnerView, TaskView
from exojet.projections.apply import apply
from exojet.projections.chat_time import Moments, where_time_went
from exojet.projections.instances import ENDED_STATUSES, PLACING, READY, steps
from exojet.projections.placing import waiting_reason
from exojet.projections.rules import FINAL_STATUSES, RESTING_STATUSES
from exojet.projections.state import ClusterState
from exojet.projections.words import describe, message_of, one_line

KINDS = ("runner", "task", "instance", "chat")
REFUSED = "[refused by the fold:"
# Statuses in which a runner can serve its instance.
_SERVING = frozenset({RUNNER_READY, RUNNER_RUNNING})


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the chain: what it said, and the target's status after it."""

    seq: int
    time: float
    subject: str
    kind: str
    words: str
    status: str


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    target_id: str
    # runner, task, instance or chat.
    target: str
    status: str
    steps: list[Step]
    cause: str


class UnknownId(Exception):
    """No runner, task, instance or chat of the log has this id."""


def _status_of(state: ClusterState, target_id: str) -> dict[str, str]:
    """The target's status under each kind it exists as (status plus the reason, so a new reason counts)."""
    found: dict[str, str] = {}
    if (r := state.runners.get(target_id)) is not None:
        found["runner"] = f"{r.status}|{r.incarnation}|{r.error_message}"
    if (t := state.tasks.get(target_id)) is not None:
        found["task"] = f"{t.status}|{t.error_type}"
    if (i := state.instances.get(target_id)) is not None:
        found["instance"] = f"{i.status}|{i.attempt}|{i.reason}"
    if (c := state.chats.get(target_id)) is not None:
        found["chat"] = f"{c.status}|{c.instance_id}"
    return found


def _names_target(state: ClusterState, anomaly_count: int, target_id: str) -> bool:
    """Whether the fold just recorded an anomaly about the target."""
    if state.anomaly_count == anomaly_count or not state.anomalies:
        return False
    a = state.anomalies[-1]
    return target_id in (a.runner_id, a.task_id) or target_id in a.detail.split()


class Explainer:
    """`explain` fed one message at a time (a log read by callback need not be held in memory)."""

    def __init__(self, target_id: str) -> None:
        self.target_id = target_id
        self.state = ClusterState()
        self._chains: dict[str, list[Step]] = {k: [] for k in KINDS}
        self._last_kind: str | None = None
        # If the target is a chat: when it was asked, routed (its first rank's task stored), started.
        self._moments = Moments()

    def feed(self, env: Envelope) -> None:
        before = _status_of(self.state, self.target_id)
        kind, words = describe(self.state, env, message_of(env))
        anomalies = self.state.anomaly_count
        self.state = apply(self.state, env)
        after = _status_of(self.state, self.target_id)
        refused = _names_target(self.state, anomalies, self.target_id)
        if refused:
            a = self.state.anomalies[-1]
            words = f"{words} {REFUSED} {a.kind}: {a.detail}]"
        for target, status in after.items():
            if status != before.get(target) or refused:
                step = Step(
                    seq=env.seq, time=env.time, subject=env.subject, kind=kind, words=words, status=status.split("|")[0]
                )
                self._chains[target].append(step)
                self._last_kind = target
        self._time_chat(env)

    def _time_chat(self, env: Envelope) -> None:
        if self.target_id not in self.state.chats or not env.time:
            return
        task = self.state.tasks.get(chat_task_id(self.target_id, 0))
        m = self._moments
        m.asked = m.asked or env.time
        if task is not None:
            m.routed = m.routed or env.time
            if task.status != TaskStatus.PENDING:
                m.started = m.started or env.time

    def result(self) -> Explanation:
        """The explanation as of the messages fed so far (UnknownId if none named the target)."""
        kinds = [k for k in KINDS if k in _status_of(self.state, self.target_id)]
        if not kinds and self._last_kind is None:
            raise UnknownId(f"no runner, task, instance or chat {self.target_id!r} in the log")
        target = kinds[0] if kinds else str(self._last_kind)
        chain = self._chains[target]
        line = cause(self.state, target, self.target_id, chain)
        if target == "chat" and (task := self.state.tasks.get(chat_task_id(self.target_id, 0))) is not None:
            spent = where_time_went(self._moments, task.result)
            line += f"; its time: {spent}" if spent else ""
        return Explanation(
            target_id=self.target_id,
            target=target,
            status=chain[-1].status if chain else "?",
            steps=chain,
            cause=one_line(line),
        )


def explain(log: Iterable[Envelope], target_id: str) -> Explanation:
    """The chain of messages that gave `target_id` its current status, and its cause in one line."""
    explainer = Explainer(target_id)
    for env in log:
        explainer.feed(env)
    return explainer.result()


def cause(state: ClusterState, target: str, target_id: str, chain: list[Step]) -> str:
    """One line naming why `target_id` is in its status, from the final state."""
    refusals = [s for s in chain if REFUSED in s.words]
    if target == "runner" and (runner := state.runners.get(target_id)) is not None:
        line = _runner_cause(state, runner)
    elif target == "task" and (task := state.tasks.get(target_id)) is not None:
        line = _task_cause(state, task)
    elif target == "instance" and (inst := state.instances.get(target_id)) is not None:
        line = _instance_cause(state, inst)
    elif target == "chat" and (chat := state.chats.get(target_id)) is not None:
        line = f"chat {target_id} is {chat.status} since seq {chat.updated_seq}" + (
            f" on {chat.instance_id}" if chat.instance_id else ""
        )
    else:
        last = chain[-1] if chain else None
        line = f"{target_id} left the projection (finished work pruned); last: " + (
            f"seq {last.seq} {last.words}" if last else "nothing"
        )
    if refusals and refusals[-1].seq >= _updated_seq(state, target, target_id):
        line += f"; the message at seq {refusals[-1].seq} that would have changed it was refused"
    return line


def _updated_seq(state: ClusterState, target: str, target_id: str) -> int:
    views: dict[str, object] = {
        "runner": state.runners.get(target_id),
        "task": state.tasks.get(target_id),
        "instance": state.instances.get(target_id),
        "chat": state.chats.get(target_id),
    }
    return int(getattr(views[target], "updated_seq", 0))


def _runner_cause(state: ClusterState, r: RunnerView) -> str:
    since = f"since seq {r.updated_seq}"
    if r.status == "RunnerLost":
        lost = f"{r.runner_id} was declared lost {since}: {r.error_message}"
        return lost + (f" (it was in {_instance_of(state, r.runner_id)})" if _instance_of(state, r.runner_id) else "")
    if r.status == RUNNER_FAILED:
        return f"{r.runner_id} failed {since}: {r.error_message or 'no message'}"
    if r.status in FINAL_STATUSES:
        return f"{r.runner_id} shut down {since} (incarnation {r.incarnation})"
    if r.status == UNREGISTERED:
        return f"{r.runner_id} has registered but written no status yet (incarnation {r.incarnation})"
    if r.status not in RESTING_STATUSES:
        working = [state.tasks[t] for t in r.running_tasks if t in state.tasks]
        during = (
            " while task " + ", ".join(f"{t.task_id} ({t.task_type})" for t in working) + " runs" if working else ""
        )
        return (
            f"{r.runner_id} is stuck in {r.status} {since}{during}: its last event is seq {r.last_event_seq}, "
            "none has ended the transition"
        )
    return f"{r.runner_id} is {r.status} {since}" + (f" with {r.model_id}" if r.model_id else "")


def _instance_of(state: ClusterState, runner_id: str) -> str | None:
    inst = state.instances.get(state.runner_instances.get(runner_id, ""))
    return inst.instance_id if inst is not None and inst.status not in ENDED_STATUSES else None


def _runner_trouble(state: ClusterState, runner_id: str) -> str | None:
    """Why a runner cannot do its part, if it cannot (failed, lost, shut down, gone)."""
    r = state.runners.get(runner_id)
    if r is None:
        return f"runner {runner_id} never registered"
    if r.status == RUNNER_FAILED or r.status in FINAL_STATUSES:
        return f"runner {runner_id} is {r.status} since seq {r.updated_seq}" + (
            f": {r.error_message}" if r.error_message else ""
        )
    return None


def _task_cause(state: ClusterState, t: TaskView) -> str:
    head = f"task {t.task_id} ({t.task_type} on {t.runner_id})"
    if t.status in TERMINAL_TASK_STATUSES:
        why = f": {t.error_type}: {t.error_message}" if t.error_type else ""
        return f"{head} is {t.status} since seq {t.updated_seq}{why}"
    trouble = _runner_trouble(state, t.runner_id)
    if trouble:
        return f"{head} is still {t.status} since seq {t.updated_seq} but {trouble}: it will never finish"
    r = state.runners[t.runner_id]
    if t.status == TaskStatus.PENDING:
        busy = f", busy with {', '.join(r.running_tasks)}" if r.running_tasks else ""
        return f"{head} is Pending since seq {t.created_seq}: runner {t.runner_id} is {r.status}{busy}"
    return f"{head} is Running since seq {t.updated_seq}; runner {t.runner_id} is {r.status}"


def _instance_cause(state: ClusterState, inst: InstanceView) -> str:
    head = f"{inst.instance_id} ({inst.model_id})"
    if inst.status in ENDED_STATUSES:
        final = " for good" if inst.gave_up else f" at attempt {inst.attempt}"
        return f"{head} is {inst.status}{final} since seq {inst.updated_seq}: {inst.reason}"
    if inst.status == PLACING:
        earlier = f" (attempt {inst.attempt} failed: {inst.reason})" if inst.reason else ""
        # The planner's own reason, from the same rule (a supervisor places it once none remains).
        waiting = waiting_reason(state, inst) or "no supervisor has placed it yet"
        return f"{head} is Placing since seq {inst.updated_seq}: {waiting}{earlier}"
    if inst.status == READY:
        for p in inst.placements:
            r = state.runners.get(p.runner_id)
            if r is None or r.status not in _SERVING or r.incarnation != p.incarnation:
                now = f"{r.status} (incarnation {r.incarnation})" if r else "unknown"
                return (
                    f"{head} is Ready in the log but its runner {p.runner_id} is {now} "
                    f"since seq {r.updated_seq if r else 0}: it cannot serve"
                )
        return f"{head} is Ready since seq {inst.updated_seq} on {', '.join(p.runner_id for p in inst.placements)}"
    for step in steps(len(inst.placements)):
        for p in inst.placements:
            tid = step_task_id(inst.instance_id, inst.attempt, step, p.runner_id)
            task = state.tasks.get(tid)
            if task is None:
                return f"{head} is {inst.status}: its {step} task for {p.runner_id} is not published yet"
            if task.status != TaskStatus.COMPLETE:
                return f"{head} is {inst.status}, waiting on {_task_cause(state, task)}"
    return f"{head} is {inst.status} since seq {inst.updated_seq}"
