"""The log as a timeline: each message a mark (its lane, its words, the status that colours it).

The live page (`api/live.py`) and `exojet replay --html` (`cli/html_report.py`) fold the log
through `fold`: `apply`, and the mark the message makes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.bus import subjects
from exojet.bus.commands import CancelChat, PlaceInstance, RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    ChatRefused,
    DownloadProgress,
    LoadProgress,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
)
from exojet.bus.ids import chat_id_of, instance_id_of
from exojet.bus.statuses import TaskStatus
from exojet.projections.apply import apply
from exojet.projections.state import ClusterState
from exojet.projections.words import describe, message_of, task_id_of

SUPERVISORS_LANE = "supervisors"


class Mark(msgspec.Struct, frozen=True):
    """One message of the log on the timeline: its lane, and a status word that colours it."""

    seq: int
    time: float
    lane: str
    kind: str
    words: str
    status: str


def lane_of(subject: str) -> str:
    """A runner's lane for its tasks, events and cancels; the supervisors' for the rest."""
    return subjects.runner_of(subject) or SUPERVISORS_LANE


def mark_status(state: ClusterState, env: Envelope, kind: str, message: object) -> str:
    """The status a mark is coloured by: that of the runner, task, instance or chat it is about, after `env`."""
    match message:
        case RunnerStatusUpdated() | RunnerLost() | RunnerRegistered() | DownloadProgress() | LoadProgress():
            runner = state.runners.get(lane_of(env.subject))
            return runner.status if runner else kind
        case PlaceInstance(command_id=command_id):
            inst = state.instances.get(instance_id_of(command_id, env.seq))
            return inst.status if inst else kind
        case RouteChatCompletion(command_id=command_id):
            chat = state.chats.get(chat_id_of(command_id, env.seq))
            return chat.status if chat else kind
        case CancelChat(chat_id=chat_id):
            return state.chats[chat_id].status if chat_id in state.chats else kind
        case ChatRefused():
            return "Refused"
    task_id = task_id_of(env, message)
    if task_id and task_id in state.tasks:
        return str(state.tasks[task_id].status)
    instance_id = getattr(message, "instance_id", None)
    if isinstance(instance_id, str) and instance_id in state.instances:
        return state.instances[instance_id].status
    return kind


class Folded(msgspec.Struct, frozen=True):
    mark: Mark
    message: Any
    # The status of the task the message is about, before it (None if it is about none).
    old_task_status: TaskStatus | None


def fold(state: ClusterState, env: Envelope) -> tuple[ClusterState, Folded]:
    """`apply`, and the message as a timeline mark (its words judged against the state before it)."""
    message = message_of(env)
    kind, words = describe(state, env, message)
    before = state.tasks.get(task_id_of(env, message) or "")
    old_status = before.status if before else None
    state = apply(state, env)
    mark = Mark(
        seq=env.seq,
        time=env.time,
        lane=lane_of(env.subject),
        kind=kind,
        words=words,
        status=mark_status(state, env, kind, message),
    )
    return state, Folded(mark, message, old_status)
