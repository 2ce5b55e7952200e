"""Every log message in words: what it is and what it changed (for `replay`, `explain`, the page).

Pure: a message is judged against the state before it, never against a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from exojet.bus import subjects
from exojet.bus.cancel import CancelTask
from exojet.bus.codec import BadInput, decode_cancel, decode_command, decode_event, decode_task
from exojet.bus.commands import (
    CancelChat,
    Command,
    DeleteInstance,
    DrainRunner,
    PlaceInstance,
    RouteChatCompletion,
    UndrainRunner,
)
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    ChatRefused,
    DownloadProgress,
    Event,
    InstanceDeleted,
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    LoadProgress,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
    event_type,
)
from exojet.bus.ids import chat_id_of, instance_id_of
from exojet.bus.statuses import UNREGISTERED, RunnerFailed, status_name
from exojet.bus.tasks import (
    ChatCompletion,
    ConnectToGroup,
    DownloadModel,
    LoadModel,
    Shutdown,
    StartWarmup,
    Task,
    UnloadModel,
    task_type,
)
from exojet.bus.views import InstanceView, RunnerView
from exojet.projections.instances import instance_capabilities
from exojet.projections.state import ClusterState

Message = Task | Event | Command | CancelTask | BadInput
_TASK_TYPES = (DownloadModel, ConnectToGroup, LoadModel, StartWarmup, ChatCompletion, UnloadModel, Shutdown)

MB = 1024 * 1024


def message_of(env: Envelope) -> Message | None:
    """The decoded message of `env` (BadInput if it does not decode, None on a subject of no kind)."""
    subject = env.subject
    try:
        if subject.startswith(subjects.TASKS_PREFIX + "."):
            return decode_task(env.data)
        if subject.startswith("exo.events."):
            return decode_event(env.data)
        if subject == subjects.COMMANDS:
            return decode_command(env.data)
        if subject.startswith(subjects.CANCEL_PREFIX + "."):
            return decode_cancel(env.data)
    except BadInput as err:
        return err
    return None


def envelope_json(env: Envelope) -> dict[str, Any]:
    """`{seq, subject, time, message}`: the message as JSON (its raw text if it is not JSON)."""
    try:
        message = msgspec.json.decode(env.data)
    except msgspec.DecodeError:
        message = {"raw": env.data.decode("utf-8", "replace")[:1000]}
    return {"seq": env.seq, "subject": env.subject, "time": env.time, "message": message}


def task_id_of(env: Envelope, message: object) -> str | None:
    """The id of the task a message is or is about."""
    if isinstance(message, TaskStatusUpdated | CancelTask):
        return message.task_id
    if env.subject.startswith(subjects.TASKS_PREFIX + "."):
        return getattr(message, "task_id", None) or str(env.seq)
    return None


def kind_of(message: Message | None) -> str:
    """The message's wire `type` (`Invalid` for one that does not decode)."""
    match message:
        case BadInput():
            return "Invalid"
        case None:
            return "-"
        case RouteChatCompletion():
            return "RouteChatCompletion"
    return str(type(message).__struct_config__.tag)


def _quote(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


def load_words(loaded: int, total: int) -> str:
    """How far a load is, as the page, `state` and the progress bars say it."""
    return f"layer {loaded} of {total}"


def chats_busy(runner: RunnerView) -> str:
    """A runner's chats in flight of its capacity ("3/16") as the page and `state` show it; empty
    while it holds no model."""
    if not runner.model_id:
        return ""
    running = len(runner.running_tasks) if runner.status == "RunnerRunning" else 0
    return f"{running}/{runner.chat_capacity}"


def can_words(runner: RunnerView) -> str:
    """What a runner can do with its loaded model beyond a plain chat ("raw, tools"), as the page
    and `state` show it; empty when it states nothing."""
    return ", ".join(runner.capabilities)


def instance_can_words(inst: InstanceView, runners: Mapping[str, RunnerView]) -> str:
    """What an instance can do, as `state` shows it (projections/instances.py `instance_capabilities`)."""
    return ", ".join(instance_capabilities(runners, inst))


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines of an engine's stderr included) as one space."""
    return " ".join(text.split())


def describe(before: ClusterState, env: Envelope, message: Message | None) -> tuple[str, str]:
    """(type, what the message says or changes, in words, on one line), judged against the state before `env`."""
    kind, words = _describe(before, env, message)
    return kind, one_line(words)


def _describe(before: ClusterState, env: Envelope, message: Message | None) -> tuple[str, str]:
    kind = kind_of(message)
    match message:
        case BadInput(error_type=error_type, message=text):
            return kind, f"refused ({error_type}): {text}"
        case None:
            return kind, f"{len(env.data)} bytes on a subject exojet does not read"
        case PlaceInstance(model_id=model, runners=runners, min_runners=n):
            where = f"on {', '.join(runners)}" if runners else f"on {n} free runner{'s' if n > 1 else ''}"
            return kind, f"place {instance_id_of(message.command_id, env.seq)}: {model} {where}"
        case DeleteInstance(instance_id=iid):
            was = before.instances[iid].status if iid in before.instances else "unknown"
            return kind, f"delete {iid} (was {was})"
        case DrainRunner(runner_id=rid):
            return kind, f"drain {rid}: its instances move elsewhere, nothing new is placed on it"
        case UndrainRunner(runner_id=rid):
            return kind, f"undrain {rid}: it takes placements again"
        case RouteChatCompletion(messages=msgs, model_id=model):
            chat = chat_id_of(message.command_id, env.seq)
            return kind, f"chat {chat} for {model or 'any model'}: {_quote(msgs[-1].content)}"
        case CancelChat(chat_id=cid, reason=reason):
            chat_was = before.chats[cid].status if cid in before.chats else "unknown"
            return kind, f"cancel chat {cid} (was {chat_was})" + (f": {reason}" if reason else "")
        case CancelTask(task_id=tid, reason=reason):
            task_was = before.tasks[tid].status if tid in before.tasks else "unknown"
            return kind, f"cancel task {tid} (was {task_was})" + (f": {reason}" if reason else "")
    if isinstance(message, _TASK_TYPES):
        return kind, _task_words(env, message)
    return kind, _event_words(before, message)


def _task_words(env: Envelope, task: Task) -> str:
    tid = task_id_of(env, task)
    match task:
        case DownloadModel(shard=shard) | LoadModel(shard=shard) if shard is not None:
            layers = f" layers {shard.start_layer}-{shard.end_layer}" if shard.start_layer is not None else ""
            return f"task {tid}: {task_type(task)} {shard.model_id}{layers}"
        case ConnectToGroup(group=group):
            return f"task {tid}: join {group.group_id} as rank {group.rank}/{group.world_size}"
        case ChatCompletion(messages=msgs, max_tokens=n):
            return f"task {tid}: {_quote(msgs[-1].content)} max_tokens={n}"
    return f"task {tid}: {task_type(task)}"


def _event_words(before: ClusterState, event: Event) -> str:
    match event:
        case RunnerRegistered(runner_id=rid, incarnation=inc, host=host, pid=pid, memory_total=mem):
            memory = f", {mem / MB / 1024:.1f} GB memory" if mem else ""
            return f"{rid} incarnation {inc} on {host} pid {pid}{memory}"
        case RunnerStatusUpdated(runner_id=rid, runner_status=status):
            was = before.runners[rid].status if rid in before.runners else UNREGISTERED
            why = f" ({status.error_message})" if isinstance(status, RunnerFailed) else ""
            return f"{rid}: {was} -> {status_name(status)}{why}"
        case TaskStatusUpdated(task_id=tid, task_status=new, error_type=et, error_message=em, result=result):
            old = before.tasks[tid].status if tid in before.tasks else "?"
            extra = f" ({et}: {em})" if et else ""
            if result and "text" in result:
                extra += f" text={_quote(str(result['text']))}"
            return f"task {tid}: {old} -> {new}{extra}"
        case DownloadProgress(
            model_id=mid, downloaded_bytes=got, total_bytes=total, completed_files=cf, total_files=tf
        ):
            pct = f" ({100 * got / total:.0f}%)" if total else ""
            return f"{mid}: {_mb(got)} of {_mb(total)}{pct}, {cf}/{tf} files"
        case LoadProgress(model_id=mid, layers_loaded=done, layers_total=total):
            return f"{mid}: {load_words(done, total)} loaded"
        case RunnerLost(runner_id=rid, reason=reason, supervisor_id=sid):
            return f"{rid} declared lost by {sid or 'a supervisor'}: {reason}"
        case InstancePlaced(instance_id=iid, placements=ps, attempt=attempt):
            where = ", ".join(_placement_words(p.runner_id, p.shard.start_layer, p.shard.end_layer) for p in ps)
            return f"{iid} attempt {attempt} placed on {where}"
        case InstanceFailed(instance_id=iid, reason=reason, attempt=attempt, final=final):
            return f"{iid} attempt {attempt} failed{' for good' if final else ''}: {reason}"
        case InstanceRetryDue(instance_id=iid, attempt=attempt):
            return f"{iid} may be placed again after attempt {attempt}"
        case InstanceDeleted(instance_id=iid, reason=reason):
            return f"{iid} deleted" + (f": {reason}" if reason else "")
        case ChatRefused(chat_id=cid, error_type=et, reason=reason):
            return f"chat {cid} refused ({et}): {reason}"
    return event_type(event)


def _placement_words(runner_id: str, start: int | None, end: int | None) -> str:
    return runner_id if start is None else f"{runner_id} (layers {start}-{end})"
