"""Query answers: plain data cut from the projection (pure)."""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.projections.checks import check
from exojet.projections.state import ClusterState, RoutedChatView, state_hash

# The full anomaly list can be long; a query shows the newest and the count.
ANOMALIES_SHOWN = 50


class QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def state_reply(state: ClusterState) -> dict[str, Any]:
    """The whole cluster: runners, tasks, downloads, the newest anomalies."""
    report = check(state)
    return {
        "seq": state.seq,
        "state_hash": state_hash(state),
        "runners": msgspec.to_builtins(state.runners),
        "tasks": msgspec.to_builtins(state.tasks),
        "downloads": msgspec.to_builtins(state.downloads),
        "instances": msgspec.to_builtins(state.instances),
        # Chats still waiting for a rank to be published (the rest are tasks).
        "pending_chats": [msgspec.to_builtins(_without_request(state.chats[c])) for c in state.pending_chats],
        "anomaly_count": len(state.anomalies),
        "anomalies": msgspec.to_builtins(state.anomalies[-ANOMALIES_SHOWN:]),
        "unfinished_tasks": len(report.unfinished_tasks),
    }


def _without_request(chat: RoutedChatView) -> RoutedChatView:
    return msgspec.structs.replace(chat, request=None)


def runner_reply(state: ClusterState, runner_id: str) -> dict[str, Any]:
    """One runner, with its tasks (newest last)."""
    runner = state.runners.get(runner_id)
    if runner is None:
        raise QueryError("NotFound", f"no runner {runner_id!r} in the log (seq {state.seq})")
    tasks = [t for t in state.tasks.values() if t.runner_id == runner_id]
    return {"seq": state.seq, "runner": msgspec.to_builtins(runner), "tasks": msgspec.to_builtins(tasks)}


def task_reply(state: ClusterState, task_id: str) -> dict[str, Any]:
    """One task."""
    task = state.tasks.get(task_id)
    if task is None:
        raise QueryError("NotFound", f"no task {task_id!r} in the log (seq {state.seq})")
    return {"seq": state.seq, "task": msgspec.to_builtins(task)}
