"""Keep the projection bounded by live work: finished things leave after a window.

A finished task, a settled routed chat or an ended instance is queued with the
log time it finished at; once a queue holds more than `Retention.finished`
entries, or its oldest entry is older than `Retention.age_s` on the log's clock,
the oldest leave the projection (they stay in the log: `exojet replay --task`).
Pruning runs in batches (a tenth of the window over, or a tenth of the age past)
so a long fold does not shift a list at every message; where the cut falls
depends only on the messages, so a replay from any snapshot prunes alike.

Work something still depends on is queued again instead of pruned: the tasks
of a live instance's current attempt (its status and the planner read them),
an ended instance a runner may still hold (the planner unloads it) and its
UnloadModel task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exojet.bus.views import Anomaly, InstanceView, TaskView
from exojet.projections.state import ClusterState


def record_anomaly(state: ClusterState, anomaly: Anomaly) -> None:
    """Count `anomaly` and keep it among the newest `retention.anomalies`."""
    state.anomaly_count += 1
    kept = state.anomalies
    kept.append(anomaly)
    limit = state.retention.anomalies
    if len(kept) > limit + max(limit // 10, 1):
        del kept[: len(kept) - limit]


def finish_task(state: ClusterState, task_id: str, time: float) -> None:
    state.finished_tasks.append((task_id, time))


def finish_chat(state: ClusterState, chat_id: str, time: float) -> None:
    state.finished_chats.append((chat_id, time))


def finish_instance(state: ClusterState, instance_id: str, time: float) -> None:
    state.finished_instances.append((instance_id, time))


def prune(
    state: ClusterState,
    now: float,
    keep_task: Callable[[ClusterState, TaskView], bool],
    keep_instance: Callable[[ClusterState, InstanceView], bool],
) -> None:
    """Drop finished work outside the retained window (`now`: the log time of the message folded).

    What `keep_task` / `keep_instance` say is still needed goes back in the queue as if it
    finished now."""
    queues: list[tuple[list[tuple[str, float]], dict[str, Any], Callable[[ClusterState, Any], bool]]] = [
        (state.finished_tasks, state.tasks, keep_task),
        (state.finished_chats, state.chats, _never),
        (state.finished_instances, state.instances, keep_instance),
    ]
    count, age = state.retention.finished, state.retention.age_s
    slack_count, slack_age = max(count // 10, 1), age / 10
    for queue, table, keep in queues:
        if not queue or (len(queue) <= count + slack_count and queue[0][1] >= now - age - slack_age):
            continue
        cut = max(len(queue) - count, 0)
        while cut < len(queue) and queue[cut][1] < now - age:
            cut += 1
        kept = []
        for key, _ in queue[:cut]:
            item = table.get(key)
            if item is None:
                continue
            if keep(state, item):
                kept.append((key, now))
            else:
                del table[key]
                state.pruned += 1
                state.pruned_seq = max(state.pruned_seq, item.updated_seq)
        del queue[:cut]
        queue.extend(kept)


def _never(state: ClusterState, item: object) -> bool:
    return False
