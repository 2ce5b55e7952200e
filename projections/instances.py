"""Instances and routed chats in the projection: commands, supervisor events, their tasks.

An instance is created by a `PlaceInstance` command (`inst-<command_id or seq>`)
in status Placing. A supervisor records where it runs with `InstancePlaced`
(runners, shards, group hosts, attempt k); from then on its status follows the
tasks of attempt k, whose ids are deterministic (`bus/ids.py`):

    Downloading -> Connecting (groups only) -> Loading -> WarmingUp -> Ready

each step complete when every runner's task of that step is Complete.
`InstanceFailed` (attempt k) makes it Failed, `InstanceRetryDue` (attempt k)
makes it Placing again for attempt k+1, `DeleteInstance` / `InstanceDeleted`
make it Deleted. Events for another attempt than the current one are stale
(a second supervisor, a replay) and only noted as anomalies.

A `RouteChatCompletion` command becomes a routed chat `chat-<command_id or seq>`;
its ChatCompletion tasks carry `stream_id` = the chat id and have ids
`<chat_id>.<rank>`, rank 0 being the one that emits chunks and the result.
A `ChatRefused` (every Ready instance of its model is full) ends a chat that no
rank was published for: it is never routed.

Everything here is called by `projections.apply` and shares its rules: no I/O,
no clock, state updated in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from exojet.bus.capabilities import Capabilities, common
from exojet.bus.codec import BadInput, decode_command
from exojet.bus.commands import (
    CancelChat,
    DeleteInstance,
    DrainRunner,
    PlaceInstance,
    RouteChatCompletion,
    UndrainRunner,
)
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    ChatRefused,
    InstanceDeleted,
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    SupervisorEvent,
)
from exojet.bus.ids import chat_id_of, chat_task_id, instance_id_of, step_task_id
from exojet.bus.sampling import choices
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, UNREGISTERED, ChatStatus, InstanceStatus, TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.bus.views import Anomaly, InstanceView, RoutedChatView, RunnerView, TaskView
from exojet.projections import retention
from exojet.projections.state import ClusterState

PLACING: Final = "Placing"
READY: Final = "Ready"
FAILED: Final = "Failed"
DELETED: Final = "Deleted"
ENDED_STATUSES: frozenset[InstanceStatus] = frozenset({FAILED, DELETED})


def on_its_way(status: str, gave_up: bool) -> bool:
    """Whether an instance is Ready or may yet be: not Deleted, and not Failed for good (a Failed
    attempt that is not final is placed again after its backoff: a drain, a lost runner)."""
    return status != DELETED and not (status == FAILED and gave_up)


# The workflow of one attempt, in the seed's order, with the status an
# instance shows while that step is not complete on every runner.
DOWNLOAD, CONNECT, LOAD, WARMUP, UNLOAD = "download", "connect", "load", "warmup", "unload"
STEP_STATUS: dict[str, InstanceStatus] = {
    DOWNLOAD: "Downloading",
    CONNECT: "Connecting",
    LOAD: "Loading",
    WARMUP: "WarmingUp",
}
# A routed chat ends with its emitting rank's terminal status.
CHAT_ENDS: dict[TaskStatus, ChatStatus] = {
    TaskStatus.COMPLETE: "Complete",
    TaskStatus.FAILED: "Failed",
    TaskStatus.TIMED_OUT: "TimedOut",
    TaskStatus.CANCELLED: "Cancelled",
}


def steps(world_size: int) -> tuple[str, ...]:
    """The steps of an attempt: ConnectToGroup only when several runners share the model."""
    return (DOWNLOAD, CONNECT, LOAD, WARMUP) if world_size > 1 else (DOWNLOAD, LOAD, WARMUP)


def _anomaly(state: ClusterState, env: Envelope, kind: str, detail: str) -> None:
    retention.record_anomaly(state, Anomaly(seq=env.seq, kind=kind, detail=detail, subject=env.subject))


def apply_command(state: ClusterState, env: Envelope) -> None:
    """Fold one message of `exo.commands`."""
    try:
        command = decode_command(env.data)
    except BadInput as err:
        _anomaly(state, env, "BadCommand", f"{err.error_type}: {err.message}")
        return
    match command:
        case PlaceInstance():
            _place_command(state, env, command)
        case DeleteInstance(instance_id=instance_id):
            inst = state.instances.get(instance_id)
            if inst is None:
                if not state.horizon:
                    _anomaly(state, env, "UnknownInstance", f"DeleteInstance of {instance_id}, which was never placed")
            elif inst.status != DELETED:
                _end(state, env, inst, DELETED, f"deleted by command {command.command_id or env.seq}")
        case CancelChat(chat_id=chat_id):
            _cancel_chat(state, env, chat_id)
        case RouteChatCompletion():
            chat_id = chat_id_of(command.command_id, env.seq)
            if chat_id in state.chats:
                _anomaly(state, env, "DuplicateCommand", f"chat {chat_id} was already requested")
                return
            state.chats[chat_id] = RoutedChatView(
                chat_id=chat_id, model_id=command.model_id, request=command, created_seq=env.seq, updated_seq=env.seq
            )
            state.pending_chats[chat_id] = None
        case DrainRunner(runner_id=runner_id):
            state.drained.setdefault(runner_id, env.seq)
        case UndrainRunner(runner_id=runner_id):
            state.drained.pop(runner_id, None)


def _place_command(state: ClusterState, env: Envelope, command: PlaceInstance) -> None:
    instance_id = instance_id_of(command.command_id, env.seq)
    if instance_id in state.instances:
        _anomaly(state, env, "DuplicateCommand", f"instance {instance_id} was already requested")
        return
    state.instances[instance_id] = InstanceView(
        instance_id=instance_id,
        model_id=command.model_id,
        requested_runners=list(command.runners) if command.runners else None,
        min_runners=max(command.min_runners, len(command.runners or ())),
        n_layers=command.n_layers,
        created_seq=env.seq,
        updated_seq=env.seq,
    )


def apply_supervisor_event(state: ClusterState, env: Envelope, event: SupervisorEvent) -> None:
    """Fold one (not yet seen) event of `exo.events.supervisor`."""
    state.supervisor_seq = env.seq
    if isinstance(event, ChatRefused):
        _refuse_chat(state, env, event)
        return
    inst = state.instances.get(event.instance_id)
    if inst is None:
        if not state.horizon:  # else it was requested before the horizon
            _anomaly(state, env, "UnknownInstance", f"{type(event).__name__} for {event.instance_id}, never requested")
        return
    match event:
        case InstancePlaced():
            if inst.status != PLACING or event.attempt != inst.attempt + 1:
                _anomaly(
                    state,
                    env,
                    "StaleInstanceEvent",
                    f"{inst.instance_id} placed as attempt {event.attempt} while {inst.status} "
                    f"at attempt {inst.attempt}",
                )
                return
            for p in event.placements:
                other = state.instances.get(state.runner_instances.get(p.runner_id, ""))
                # Still there: `other` may have been placed again elsewhere since (a drain, a retry).
                if (
                    other is not None
                    and other.status not in ENDED_STATUSES
                    and any(q.runner_id == p.runner_id for q in other.placements)
                ):
                    _anomaly(
                        state,
                        env,
                        "RunnerInTwoInstances",
                        f"{p.runner_id} placed in {inst.instance_id} while in {other.instance_id}",
                    )
                state.runner_instances[p.runner_id] = inst.instance_id
            inst.attempt = event.attempt
            # A failed attempt's reason explained the Placing it left the instance in, which ends here.
            inst.reason = None
            inst.placements = list(event.placements)
            inst.hosts = list(event.hosts)
            inst.placed_seq = env.seq
            inst.updated_seq = env.seq
            refresh_status(state, inst)
        case InstanceFailed():
            if inst.status in ENDED_STATUSES or event.attempt != inst.attempt:
                _anomaly(
                    state,
                    env,
                    "StaleInstanceEvent",
                    f"{inst.instance_id} failed at attempt {event.attempt} while {inst.status} "
                    f"at attempt {inst.attempt}",
                )
                return
            inst.gave_up = event.final
            # A move off a drained runner is no failure of the instance's: its count stays.
            if inst.status == READY:
                inst.failed_unready = 0
            elif not event.drained:
                inst.failed_unready += 1
            _end(state, env, inst, FAILED, event.reason)
        case InstanceRetryDue():
            if inst.status != FAILED or inst.gave_up or event.attempt != inst.attempt:
                _anomaly(
                    state,
                    env,
                    "StaleInstanceEvent",
                    f"{inst.instance_id} retry after attempt {event.attempt} while {inst.status} "
                    f"at attempt {inst.attempt}",
                )
                return
            # The reason of the failed attempt stays visible while placing again (until placed).
            inst.status = PLACING
            inst.placements = []
            inst.hosts = []
            inst.updated_seq = env.seq
        case InstanceDeleted():
            if inst.status != DELETED:
                _end(state, env, inst, DELETED, event.reason or "deleted by a supervisor")


def _cancel_chat(state: ClusterState, env: Envelope, chat_id: str) -> None:
    """A chat cancelled while pending is never routed; one routed already is its ranks' business."""
    chat = state.chats.get(chat_id)
    if chat is None:
        if not state.horizon:
            _anomaly(state, env, "UnknownChat", f"CancelChat of {chat_id}, which was never requested")
        return
    if chat.ranks_published or chat_id not in state.pending_chats:
        return
    chat.status = "Cancelled"
    chat.updated_seq = env.seq
    chat.request = None
    del state.pending_chats[chat_id]
    retention.finish_chat(state, chat_id, env.time)


def _refuse_chat(state: ClusterState, env: Envelope, event: ChatRefused) -> None:
    chat = state.chats.get(event.chat_id)
    if chat is None or chat.ranks_published:
        # Another supervisor routed it first (or it was never requested): it runs.
        _anomaly(state, env, "StaleChatRefusal", f"{event.chat_id} refused after it was routed or never requested")
        return
    chat.status = "Refused"
    chat.updated_seq = env.seq
    chat.request = None
    state.pending_chats.pop(chat.chat_id, None)
    retention.finish_chat(state, chat.chat_id, env.time)


def _end(state: ClusterState, env: Envelope, inst: InstanceView, status: InstanceStatus, reason: str) -> None:
    inst.status = status
    inst.reason = reason
    inst.updated_seq = env.seq
    if status == DELETED or inst.gave_up:
        retention.finish_instance(state, inst.instance_id, env.time)


# A runner in one of these holds no instance's model any more.
_RELEASED_STATUSES = frozenset({"RunnerIdle", "RunnerShutdown", "RunnerLost", UNREGISTERED})


def still_held(state: ClusterState, inst: InstanceView) -> bool:
    """Whether a runner of `inst`'s placement may still hold its model (the planner may yet unload it)."""
    for p in inst.placements:
        runner = state.runners.get(p.runner_id)
        if (
            runner is not None
            and state.runner_instances.get(p.runner_id) == inst.instance_id
            and runner.incarnation == p.incarnation
            and runner.status not in _RELEASED_STATUSES
        ):
            return True
    return False


def holds(state: ClusterState, task: TaskView) -> bool:
    """Whether the planner still reads `task`: a task of its instance's current attempt while the
    instance is live (its steps) or, ended, still held by a runner (its UnloadModel)."""
    inst = state.instances.get(task.instance_id or "")
    if inst is None or task.task_type == "ChatCompletion":
        return False
    if not task.task_id.startswith(f"{inst.instance_id}.a{inst.attempt}."):
        return False
    if inst.status in ENDED_STATUSES:
        return still_held(state, inst)
    return bool(inst.placements)


def refresh_status(state: ClusterState, inst: InstanceView) -> None:
    """Derive a placed instance's status from its current attempt's step tasks."""
    if not inst.placements or inst.status in ENDED_STATUSES:
        return
    for step in steps(len(inst.placements)):
        for p in inst.placements:
            task = state.tasks.get(step_task_id(inst.instance_id, inst.attempt, step, p.runner_id))
            if task is None or task.status != TaskStatus.COMPLETE:
                inst.status = STEP_STATUS[step]
                return
    inst.status = READY


def on_task(state: ClusterState, env: Envelope, task: ChatCompletion, view: TaskView) -> None:
    """A ChatCompletion task was published: tie it to its routed chat, if any."""
    chat = state.chats.get(task.stream_id or "")
    if chat is None:
        return
    if chat.ranks_published == 0 and view.task_id == chat_task_id(chat.chat_id, 0):
        # Rank 0 records which instance serves the chat; the other ranks follow it.
        chat.status = "Routed"
        chat.instance_id = task.instance_id
        chat.choices = choices(task)
        state.chat_tasks[view.task_id] = chat.chat_id
        inst = state.instances.get(task.instance_id or "")
        if inst is not None:
            inst.chats_in_flight += chat.choices
    elif not (
        chat.ranks_published and task.instance_id == chat.instance_id and view.task_id.startswith(chat.chat_id + ".")
    ):
        return
    chat.ranks_published += 1
    chat.updated_seq = env.seq
    inst = state.instances.get(chat.instance_id or "")
    if inst is None or chat.ranks_published >= len(inst.placements):
        state.pending_chats.pop(chat.chat_id, None)
        chat.request = None


def on_task_status(state: ClusterState, env: Envelope, task: TaskView) -> None:
    """A task's status changed: refresh its instance, settle its routed chat."""
    chat_id = state.chat_tasks.get(task.task_id)
    if chat_id is not None and task.status in TERMINAL_TASK_STATUSES:
        del state.chat_tasks[task.task_id]
        chat = state.chats[chat_id]
        chat.status = CHAT_ENDS[task.status]
        chat.updated_seq = env.seq
        retention.finish_chat(state, chat_id, env.time)
        state.pending_chats.pop(chat_id, None)
        chat.request = None
        inst = state.instances.get(chat.instance_id or "")
        if inst is not None:
            inst.chats_in_flight = max(0, inst.chats_in_flight - chat.choices)
        return
    inst = state.instances.get(task.instance_id or "")
    if inst is not None and inst.status not in ENDED_STATUSES and task.task_type != "ChatCompletion":
        refresh_status(state, inst)
        inst.updated_seq = env.seq


def instance_capabilities(runners: Mapping[str, RunnerView], inst: InstanceView) -> Capabilities:
    """What an instance can do beyond a plain chat: what every runner of it states."""
    return common(r.capabilities if (r := runners.get(p.runner_id)) is not None else () for p in inst.placements)
