"""`apply(state, envelope)`: fold one log message into the cluster state.

Pure in the sense that matters for replay: no I/O, no clock, no randomness, the
result depends only on the state and the message. For speed (a rebuild folds
hundreds of thousands of messages) it updates `state` in place and returns it;
take `copy_state()` first to keep an older version. Nothing here raises on bad
data: what the contract does not allow is applied as reported and recorded as
an `Anomaly`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from exojet.bus import subjects
from exojet.bus.capabilities import capabilities
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    DownloadProgress,
    LoadProgress,
    RunnerEvent,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    SupervisorEvent,
    TaskStatusUpdated,
)
from exojet.bus.results import LoadResult, result_as
from exojet.bus.statuses import (
    TERMINAL_TASK_STATUSES,
    UNREGISTERED,
    RunnerFailed,
    RunnerStatusName,
    TaskStatus,
    status_name,
)
from exojet.bus.tasks import ChatCompletion, DownloadModel, LoadModel, task_type
from exojet.bus.views import Anomaly, DownloadView, LoadView, RunnerView, TaskView
from exojet.projections import conversations, instances, retention
from exojet.projections.rules import transition_allowed
from exojet.projections.state import EVENT_ID_WINDOW, ClusterState, download_key

_TASKS = subjects.TASKS_PREFIX + "."
_RUNNER_EVENTS = subjects.RUNNER_EVENTS_PREFIX + "."

# Summaries keep the projection small: a chat's full text lives in the log.
RESULT_TEXT_PREVIEW = 200


def copy_state(state: ClusterState) -> ClusterState:
    """A deep, independent copy."""
    return msgspec.convert(msgspec.to_builtins(state), ClusterState)


def _anomaly(state: ClusterState, env: Envelope, kind: str, detail: str, **ids: str | None) -> None:
    retention.record_anomaly(state, Anomaly(seq=env.seq, kind=kind, detail=detail, subject=env.subject, **ids))


def _runner(state: ClusterState, runner_id: str) -> RunnerView:
    view = state.runners.get(runner_id)
    if view is None:
        view = state.runners[runner_id] = RunnerView(runner_id=runner_id)
    return view


def _seen(state: ClusterState, event_id: str) -> bool:
    ids = state.recent_event_ids
    if event_id in ids:
        return True
    ids[event_id] = None
    # Trim in batches: deleting the oldest key one at a time makes dict
    # iteration skip ever more dead slots (quadratic over a long replay).
    if len(ids) > EVENT_ID_WINDOW + EVENT_ID_WINDOW // 2:
        state.recent_event_ids = dict.fromkeys(list(ids)[-EVENT_ID_WINDOW:])
    return False


def apply(state: ClusterState, env: Envelope) -> ClusterState:
    """Fold `env` into `state` and return it (see the module docstring)."""
    if env.seq <= state.seq:
        return state  # already folded: replays and redeliveries overlap
    if env.seq > state.seq + 1:
        state.horizon = env.seq
    state.seq = env.seq
    subject = env.subject
    if subject.startswith(_TASKS):
        _apply_task(state, env, subject[len(_TASKS) :])
    elif subject.startswith(_RUNNER_EVENTS):
        _apply_runner_event(state, env, subject[len(_RUNNER_EVENTS) :])
    elif subject == subjects.COMMANDS:
        instances.apply_command(state, env)
    elif subject == subjects.SUPERVISOR_EVENTS:
        _apply_supervisor_event(state, env)
    retention.prune(state, env.time, instances.holds, instances.still_held)
    return state


def _apply_task(state: ClusterState, env: Envelope, runner_id: str) -> None:
    try:
        task = decode_task(env.data)
    except BadInput as err:
        # The runner answers it under the task's sequence; track it like any task.
        task_id = str(env.seq)
        state.tasks[task_id] = TaskView(
            task_id=task_id,
            task_type="Invalid",
            runner_id=runner_id,
            created_seq=env.seq,
            updated_seq=env.seq,
            error_type=err.error_type,
            error_message=err.message,
        )
        state.unfinished[task_id] = None
        _anomaly(state, env, "BadTask", f"{err.error_type}: {err.message}", runner_id=runner_id, task_id=task_id)
        return
    task_id = task.task_id or str(env.seq)
    if task_id in state.tasks:
        _anomaly(
            state, env, "DuplicateTask", f"task {task_id} was already published", runner_id=runner_id, task_id=task_id
        )
        return
    model_id = None
    match task:
        case DownloadModel(shard=shard) | LoadModel(shard=shard) if shard is not None:
            model_id = shard.model_id
    view = state.tasks[task_id] = TaskView(
        task_id=task_id,
        task_type=task_type(task),
        runner_id=runner_id,
        instance_id=task.instance_id,
        model_id=model_id,
        created_seq=env.seq,
        updated_seq=env.seq,
    )
    state.unfinished[task_id] = None
    if isinstance(task, ChatCompletion) and task.stream_id is not None:
        instances.on_task(state, env, task, view)
    if isinstance(task, ChatCompletion) and not task.raw and (runner := state.runners.get(runner_id)) is not None:
        conversations.remember(runner, task.messages)


def _apply_supervisor_event(state: ClusterState, env: Envelope) -> None:
    try:
        event = decode_event(env.data)
    except BadInput as err:
        _anomaly(state, env, "BadEvent", f"{err.error_type}: {err.message}")
        return
    if not isinstance(event, SupervisorEvent):
        _anomaly(state, env, "WrongSubject", f"runner event {type(event).__name__} on {env.subject}")
        return
    if not _seen(state, event.event_id):
        instances.apply_supervisor_event(state, env, event)


def _apply_runner_event(state: ClusterState, env: Envelope, subject_runner: str) -> None:
    try:
        event = decode_event(env.data)
    except BadInput as err:
        _anomaly(state, env, "BadEvent", f"{err.error_type}: {err.message}", runner_id=subject_runner)
        return
    if _seen(state, event.event_id):
        return
    if not isinstance(event, RunnerEvent):
        _anomaly(
            state,
            env,
            "WrongSubject",
            f"supervisor event {type(event).__name__} on {env.subject}",
            runner_id=subject_runner,
        )
        return
    # A dict lookup on the type instead of a chain of class patterns: this is
    # the hottest line of a rebuild.
    handler = _RUNNER_HANDLERS[type(event)]
    runner_id = event.runner_id
    if runner_id != subject_runner:
        _anomaly(state, env, "WrongSubject", f"event for runner {runner_id} on {env.subject}", runner_id=runner_id)
        return
    runner = state.runners.get(runner_id) or _runner(state, runner_id)
    runner.last_event_seq = env.seq
    if state.horizon and runner.status == UNREGISTERED and runner.incarnation == 0:
        runner.incarnation = event.incarnation  # registered before the horizon
    if event.incarnation != runner.incarnation and handler is not _register and handler is not _lose:
        _anomaly(
            state,
            env,
            "StaleIncarnation",
            f"event of incarnation {event.incarnation}, runner is at {runner.incarnation}",
            runner_id=runner_id,
        )
        return
    handler(state, env, runner, event)


def _runner_status(state: ClusterState, env: Envelope, runner: RunnerView, event: RunnerStatusUpdated) -> None:
    status = event.runner_status
    _set_status(
        state, env, runner, status_name(status), status.error_message if isinstance(status, RunnerFailed) else None
    )


def _download(state: ClusterState, env: Envelope, runner: RunnerView, event: DownloadProgress) -> None:
    state.downloads[download_key(runner.runner_id, event.model_id)] = DownloadView(
        runner_id=runner.runner_id,
        model_id=event.model_id,
        downloaded_bytes=event.downloaded_bytes,
        total_bytes=event.total_bytes,
        completed_files=event.completed_files,
        total_files=event.total_files,
        updated_seq=env.seq,
    )


def _load(state: ClusterState, env: Envelope, runner: RunnerView, event: LoadProgress) -> None:
    state.loads[download_key(runner.runner_id, event.model_id)] = LoadView(
        runner_id=runner.runner_id,
        model_id=event.model_id,
        task_id=event.task_id,
        layers_loaded=event.layers_loaded,
        layers_total=event.layers_total,
        updated_seq=env.seq,
    )


def _register(state: ClusterState, env: Envelope, runner: RunnerView, event: RunnerRegistered) -> None:
    if event.incarnation <= runner.incarnation:
        _anomaly(
            state,
            env,
            "StaleIncarnation",
            f"registered incarnation {event.incarnation}, already at {runner.incarnation}",
            runner_id=runner.runner_id,
        )
    # A new incarnation starts from scratch. A task the old process was running
    # stays Running here until the new one answers it (it writes Failed with
    # RunnerRestarted first thing), so every terminal status is in the log.
    runner.running_tasks = []
    runner.chat_capacity = 1
    runner.capabilities = ()
    runner.conversations = []
    runner.incarnation = event.incarnation
    runner.status = UNREGISTERED
    runner.error_message = None
    runner.model_id = None
    runner.host = event.host
    runner.pid = event.pid
    runner.memory_total = event.memory_total
    runner.memory_free = event.memory_free
    runner.address = event.address
    runner.engines = event.engines
    runner.ring_key = event.ring_key
    runner.registered_seq = env.seq
    runner.updated_seq = env.seq


def _set_status(
    state: ClusterState, env: Envelope, runner: RunnerView, new: RunnerStatusName, error: str | None
) -> None:
    if not transition_allowed(runner.status, new) and not (state.horizon and runner.status == UNREGISTERED):
        _anomaly(state, env, "InvalidTransition", f"{runner.status} -> {new}", runner_id=runner.runner_id)
    runner.status = new
    runner.error_message = error
    runner.updated_seq = env.seq
    if new == "RunnerIdle":
        # The model and its caches are gone.
        runner.model_id = None
        runner.chat_capacity = 1
        runner.capabilities = ()
        runner.conversations = []


def _task_status(state: ClusterState, env: Envelope, runner: RunnerView, event: TaskStatusUpdated) -> None:
    task = state.tasks.get(event.task_id)
    if task is None:
        if not state.horizon:  # else it was published before the horizon
            _anomaly(
                state,
                env,
                "UnknownTask",
                f"status {event.task_status} for a task never published",
                runner_id=runner.runner_id,
                task_id=event.task_id,
            )
        task = state.tasks[event.task_id] = TaskView(
            task_id=event.task_id,
            task_type=event.task_type or "Unknown",
            runner_id=runner.runner_id,
            created_seq=env.seq,
        )
        state.unfinished[event.task_id] = None
    if task.status in TERMINAL_TASK_STATUSES:
        _anomaly(
            state,
            env,
            "TaskAfterTerminal",
            f"{task.status} -> {event.task_status}",
            runner_id=runner.runner_id,
            task_id=task.task_id,
        )
        return
    task.status = event.task_status
    task.updated_seq = env.seq
    if event.error_type is not None:
        task.error_type = event.error_type
        task.error_message = event.error_message
    if event.result is not None:
        task.result = _summary(event.result)
    if event.task_status == TaskStatus.RUNNING:
        if task.task_id not in runner.running_tasks:
            runner.running_tasks.append(task.task_id)
    elif task.task_id in runner.running_tasks:
        runner.running_tasks.remove(task.task_id)
    if event.task_status == TaskStatus.COMPLETE and task.task_type == "LoadModel":
        runner.model_id = task.model_id
        loaded = result_as(LoadResult, event.result)
        runner.chat_capacity = loaded.chat_capacity if loaded is not None else 1
        runner.capabilities = capabilities(loaded.capabilities) if loaded is not None else ()
    if task.status in TERMINAL_TASK_STATUSES:
        _finished(state, env, task)
    if task.instance_id is not None:
        instances.on_task_status(state, env, task)


def _finished(state: ClusterState, env: Envelope, task: TaskView) -> None:
    state.unfinished.pop(task.task_id, None)
    retention.finish_task(state, task.task_id, env.time)


def _summary(result: dict[str, object]) -> dict[str, object]:
    text = result.get("text")
    if isinstance(text, str) and len(text) > RESULT_TEXT_PREVIEW:
        return {**result, "text": text[:RESULT_TEXT_PREVIEW] + "…"}
    return result


def _fail_running_tasks(state: ClusterState, env: Envelope, runner: RunnerView, error_type: str, why: str) -> None:
    """Each task the runner runs (every chat in flight) fails, with one terminal status."""
    running, runner.running_tasks = runner.running_tasks, []
    for task_id in running:
        task = state.tasks.get(task_id)
        if task is not None and task.status not in TERMINAL_TASK_STATUSES:
            task.status = TaskStatus.FAILED
            task.error_type = error_type
            task.error_message = why
            task.updated_seq = env.seq
            _finished(state, env, task)
            if task.instance_id is not None:
                instances.on_task_status(state, env, task)


def _lose(state: ClusterState, env: Envelope, runner: RunnerView, event: RunnerLost) -> None:
    _fail_running_tasks(state, env, runner, "RunnerLost", f"runner {runner.runner_id} was lost: {event.reason}")
    runner.status = "RunnerLost"
    runner.error_message = event.reason
    runner.updated_seq = env.seq


_RUNNER_HANDLERS: dict[type, Callable[[ClusterState, Envelope, RunnerView, Any], None]] = {
    RunnerStatusUpdated: _runner_status,
    TaskStatusUpdated: _task_status,
    DownloadProgress: _download,
    LoadProgress: _load,
    RunnerRegistered: _register,
    RunnerLost: _lose,
}
