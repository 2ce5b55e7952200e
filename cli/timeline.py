"""One line per log message, saying what changed in words (for `exojet replay`)."""

from __future__ import annotations

import datetime

from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    DownloadProgress,
    Event,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
    event_type,
)
from exojet.bus.statuses import RunnerFailed, status_name
from exojet.bus.tasks import ChatCompletion, DownloadModel, LoadModel, Task, task_type
from exojet.projections.state import ClusterState


def message_of(env: Envelope) -> Task | Event | BadInput | None:
    """The decoded task or event of `env` (BadInput if it does not decode, None for others)."""
    try:
        if env.subject.startswith("exo.tasks."):
            return decode_task(env.data)
        if env.subject.startswith("exo.events."):
            return decode_event(env.data)
    except BadInput as err:
        return err
    return None


def task_id_of(env: Envelope, message: object) -> str | None:
    """The id of the task a message is or is about."""
    if isinstance(message, TaskStatusUpdated):
        return message.task_id
    if env.subject.startswith("exo.tasks."):
        return getattr(message, "task_id", None) or str(env.seq)
    return None


def describe(before: ClusterState, env: Envelope, message: Task | Event | BadInput | None) -> tuple[str, str]:
    """(type, the change in words), judged against the state before `env`."""
    match message:
        case BadInput(error_type=error_type, message=text):
            return "Invalid", f"refused ({error_type}): {text}"
        case DownloadModel(shard=shard) | LoadModel(shard=shard) if shard is not None:
            return task_type(message), f"task {task_id_of(env, message)} for {shard.model_id}"
        case ChatCompletion(messages=msgs, max_tokens=n):
            return "ChatCompletion", f"task {task_id_of(env, message)}: {msgs[-1].content[:40]!r} max_tokens={n}"
        case RunnerRegistered(runner_id=rid, incarnation=inc, host=host, pid=pid):
            return "RunnerRegistered", f"{rid} incarnation {inc} on {host} pid {pid}"
        case RunnerStatusUpdated(runner_id=rid, runner_status=status):
            old = before.runners[rid].status if rid in before.runners else "Unregistered"
            why = f" ({status.error_message})" if isinstance(status, RunnerFailed) else ""
            return "RunnerStatusUpdated", f"{rid}: {old} -> {status_name(status)}{why}"
        case TaskStatusUpdated(task_id=tid, task_status=new, error_type=et, error_message=em, result=result):
            old = before.tasks[tid].status if tid in before.tasks else "?"
            extra = f" ({et}: {em})" if et else ""
            if result and "text" in result:
                extra += f" text={str(result['text'])[:40]!r}"
            return "TaskStatusUpdated", f"task {tid}: {old} -> {new}{extra}"
        case DownloadProgress(
            model_id=mid, downloaded_bytes=got, total_bytes=total, completed_files=cf, total_files=tf
        ):
            return "DownloadProgress", f"{mid}: {got}/{total} bytes, {cf}/{tf} files"
        case RunnerLost(runner_id=rid, reason=reason):
            return "RunnerLost", f"{rid} lost: {reason}"
        case None:
            return "-", f"{len(env.data)} bytes"
    if isinstance(message, Task):
        return task_type(message), f"task {task_id_of(env, message)}"
    return event_type(message), ""


def timeline_line(env: Envelope, kind: str, words: str) -> str:
    """`seq  time  subject  type  words`."""
    when = datetime.datetime.fromtimestamp(env.time).strftime("%H:%M:%S.%f")[:-3] if env.time else "-"
    return f"{env.seq:>7}  {when}  {env.subject:<28}  {kind:<20}  {words}"
