"""Query answers cut from the projection (pure): the reply structs of bus/replies.py, holding
the projection's own views, encoded straight to JSON when sent (no copy into plain dicts)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

import msgspec

from exojet.bus.queries import DEFAULT_LIMIT, MAX_LIMIT, SECTIONS
from exojet.bus.replies import InstanceReply, Page, RunnerReply, StateReply, TaskReply
from exojet.bus.views import InstanceView, RoutedChatView, TaskView
from exojet.projections.instances import ENDED_STATUSES
from exojet.projections.placing import waiting_reason
from exojet.projections.state import ClusterState, state_hash

# The newest anomalies a reply shows (the count is of all of them).
ANOMALIES_SHOWN = 50

T = TypeVar("T")


class QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Paging(msgspec.Struct, kw_only=True, frozen=True):
    offset: int = 0
    limit: int = DEFAULT_LIMIT

    def cut(self, items: Iterable[T], total: int) -> tuple[list[T], Page]:
        """This page of `items` (`total` long) and where it lies in them."""
        offset = max(self.offset, 0)
        limit = min(max(self.limit, 0), MAX_LIMIT)
        page = list(islice(items, offset, offset + limit))
        end = offset + len(page)
        return page, Page(total=total, offset=offset, limit=limit, next_offset=end if end < total else None)


FIRST_PAGE = Paging()


def _instances(views: list[InstanceView]) -> dict[str, InstanceView]:
    return {v.instance_id: v for v in views}


def _newest_first(tasks: dict[str, TaskView]) -> Iterator[TaskView]:
    # A dict keeps the order tasks were published in.
    return reversed(tasks.values())


class Filters(msgspec.Struct, kw_only=True, frozen=True):
    """Narrow `state`'s collections: which are listed, runners in one status, instances in one status."""

    sections: tuple[str, ...] = SECTIONS
    runner_status: str | None = None
    instance_status: str | None = None

    def paging(self, section: str, paging: Paging) -> Paging:
        """`paging` for a listed section, an empty page (counts only) for the others."""
        return paging if section in self.sections else Paging(limit=0)


NO_FILTERS = Filters()


def state_reply(
    state: ClusterState, paging: Paging = FIRST_PAGE, filters: Filters = NO_FILTERS, with_hash: bool = False
) -> StateReply:
    """Counts of everything, and one page of runners (by id), instances (live first, newest
    first) and tasks (newest first); `load`: each listed runner's unfinished tasks;
    anomalies: the count and the newest few."""
    runner_ids = sorted(r for r, v in state.runners.items() if filters.runner_status in (None, v.status))
    runners, runners_page = filters.paging("runners", paging).cut(
        (state.runners[r] for r in runner_ids), len(runner_ids)
    )
    live = sorted(
        (i for i in state.instances.values() if filters.instance_status in (None, i.status)),
        key=lambda i: (i.status in ENDED_STATUSES, -i.created_seq),
    )
    instances, instances_page = filters.paging("instances", paging).cut(live, len(live))
    tasks, tasks_page = filters.paging("tasks", paging).cut(_newest_first(state.tasks), len(state.tasks))
    load = {r.runner_id: 0 for r in runners}
    for task_id in state.unfinished:
        runner_id = state.tasks[task_id].runner_id
        if runner_id in load:
            load[runner_id] += 1
    return StateReply(
        seq=state.seq,
        runners={r.runner_id: r for r in runners},
        runners_page=runners_page,
        load=load,
        instances=_instances(instances),
        instances_page=instances_page,
        waiting=_waiting(state, instances),
        tasks={t.task_id: t for t in tasks},
        tasks_page=tasks_page,
        downloads=dict(state.downloads),
        loads=dict(state.loads),
        pending_chats=[_without_request(state.chats[c]) for c in islice(state.pending_chats, MAX_LIMIT)],
        pending_chat_count=len(state.pending_chats),
        anomaly_count=state.anomaly_count,
        anomalies=state.anomalies[-ANOMALIES_SHOWN:],
        drained=sorted(state.drained),
        unfinished_tasks=len(state.unfinished),
        retention=state.retention,
        pruned=state.pruned,
        pruned_seq=state.pruned_seq,
        # The whole state's digest: costs a full encode, so only on request.
        state_hash=state_hash(state) if with_hash else msgspec.UNSET,
    )


def _without_request(chat: RoutedChatView) -> RoutedChatView:
    return msgspec.structs.replace(chat, request=None)


def _not_found(state: ClusterState, what: str, key: str, replay: str) -> QueryError:
    message = f"no {what} {key!r} in the live projection (seq {state.seq})"
    if state.pruned:
        message += (
            f"; finished work leaves it after the newest {state.retention.finished} or "
            f"{state.retention.age_s:g} s (pruned up to seq {state.pruned_seq}): "
            f"the log still has it, see `{replay}`"
        )
    return QueryError("NotFound", message)


def runner_reply(state: ClusterState, runner_id: str, paging: Paging = FIRST_PAGE) -> RunnerReply:
    """One runner, a page of its tasks (newest first), and the live instances that name it."""
    runner = state.runners.get(runner_id)
    if runner is None:
        raise QueryError("NotFound", f"no runner {runner_id!r} in the log (seq {state.seq})")
    own = [t for t in _newest_first(state.tasks) if t.runner_id == runner_id]
    tasks, tasks_page = paging.cut(own, len(own))
    instances = [
        i
        for i in state.instances.values()
        if i.status not in ENDED_STATUSES
        and (runner_id in (i.requested_runners or ()) or any(p.runner_id == runner_id for p in i.placements))
    ]
    return RunnerReply(
        seq=state.seq,
        runner=runner,
        drained=runner_id in state.drained,
        tasks=tasks,
        tasks_page=tasks_page,
        instances=_instances(instances),
    )


def task_reply(state: ClusterState, task_id: str) -> TaskReply:
    """One task."""
    task = state.tasks.get(task_id)
    if task is None:
        raise _not_found(state, "task", task_id, f"exojet replay --task {task_id}")
    return TaskReply(seq=state.seq, task=task)


def instance_reply(state: ClusterState, instance_id: str) -> InstanceReply:
    """One instance."""
    inst = state.instances.get(instance_id)
    if inst is None:
        raise _not_found(state, "instance", instance_id, f"exojet replay --json | grep '\"{instance_id}'")
    return InstanceReply(seq=state.seq, instance=inst, waiting=waiting_reason(state, inst))


def _waiting(state: ClusterState, instances: list[InstanceView]) -> dict[str, str]:
    return {i.instance_id: reason for i in instances if (reason := waiting_reason(state, i)) is not None}
