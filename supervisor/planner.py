"""The planner: a pure function from the projection to what should be published next.

`plan(state, catalog, config)` reads only its arguments (no clock, no I/O), so
two supervisors, or one restarted, plan the same from the same log. It returns

- `SendTask`: a task for a runner, its id deterministic (instance, attempt,
  step, runner; or chat, rank) and sent as `Nats-Msg-Id`. A task already in
  the projection is never planned again, so nothing is published twice even
  beyond the server's dedupe window;
- `WriteEvent`: a supervisor event (InstancePlaced, InstanceFailed), its
  `event_id` deterministic too. InstancePlaced carries `fence`, the projection's
  last sequence of `exo.events.supervisor`: two supervisors placing different
  instances on the same runner at once cannot both succeed;
- `RetryWait`: a failed instance may be placed again after `delay` seconds.
  Waiting needs a clock, so the reconciler does it and then writes
  `InstanceRetryDue`; the planner only counts attempts.

The workflow of an instance is the seed's order: every runner downloads the
model, then (groups only) every runner connects, then every runner loads its
shard, then every runner warms up; each step starts once the previous one is
Complete on every runner. Chats go to a Ready instance of their model, the one
with the fewest chats in flight first.

Layer counts: one runner gets the whole model and needs none. A group needs
the model's `n_layers` to split it: from the PlaceInstance command, else from
`catalog` (model id -> n_layers, which the reconciler reads from config.json in
the supervisor's `--models-dir`, if given); the split is then recorded in
`InstancePlaced`. Without either, the group is placed with whole-model shards
(rank and world size only) and split when its downloads are Complete, from the
`n_layers` each runner's DownloadModel result reports; the LoadModel tasks carry
the ranges. Either way the log holds the split: replay never needs the disk.
"""

from __future__ import annotations

from collections.abc import Mapping

from exojet.bus import lifecycle
from exojet.bus.ids import step_task_id
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, RunnerStatusName, TaskStatus
from exojet.bus.tasks import ConnectToGroup, DownloadModel, Group, LoadModel, Shard, StartWarmup, Task, UnloadModel
from exojet.bus.views import InstanceView
from exojet.projections.instances import (
    CONNECT,
    DOWNLOAD,
    ENDED_STATUSES,
    FAILED,
    LOAD,
    PLACING,
    READY,
    UNLOAD,
    WARMUP,
    steps,
)
from exojet.projections.placing import busy_runners, drained_placements
from exojet.projections.rules import FINAL_STATUSES
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import DEFAULT_CONFIG, Action, PlannerConfig, RetryWait, SendTask, failed
from exojet.supervisor.chat_routing import route_chats
from exojet.supervisor.placement import place, split_after_download

# A runner resting in one of these still holds (or failed holding) an ended
# instance's model or group: UnloadModel brings it back to Idle. A runner in a
# transient status (Loading, WarmingUp ...) is unloaded once it settles.
UNLOADABLE_STATUSES: frozenset[RunnerStatusName] = frozenset(
    {lifecycle.CONNECTED, lifecycle.LOADED, lifecycle.READY, lifecycle.FAILED}
)
# A runner that is gone, or going, cannot serve its instance any more.
GONE_STATUSES: frozenset[RunnerStatusName] = FINAL_STATUSES | {lifecycle.SHUTTING_DOWN, lifecycle.FAILED}
EMPTY_CATALOG: Mapping[str, int] = {}


def plan(
    state: ClusterState, catalog: Mapping[str, int] = EMPTY_CATALOG, config: PlannerConfig = DEFAULT_CONFIG
) -> list[Action]:
    """What to publish now, given the projection (see the module docstring)."""
    actions: list[Action] = []
    busy = busy_runners(state)
    placed_one = False
    for inst in state.instances.values():
        if inst.status == PLACING and not inst.placements:
            # One placement per plan: its fence would fail any second one anyway.
            if not placed_one and (action := place(state, inst, busy, catalog, config)) is not None:
                actions.append(action)
                placed_one = True
        elif inst.status == FAILED and not inst.gave_up:
            # The wait grows with the failures in a row before Ready, not the attempt's number:
            # an instance that has served since waits the least again.
            actions.append(RetryWait(inst.instance_id, inst.attempt, backoff(inst.failed_unready, config)))
        elif inst.status not in ENDED_STATUSES:
            actions.extend(_advance(state, inst, config))
    actions.extend(_release(state))
    actions.extend(route_chats(state, config))
    return actions


def backoff(in_a_row: int, config: PlannerConfig) -> float:
    """Seconds to wait after `in_a_row` attempts failed before Ready (0 or 1: the base; then 2, 4 ... capped)."""
    delay: float = config.backoff_base_s * 2 ** max(in_a_row - 1, 0)
    return min(delay, config.backoff_cap_s)


def _failure(state: ClusterState, inst: InstanceView) -> str | None:
    """Why the current attempt cannot succeed any more, or None."""
    for p in inst.placements:
        runner = state.runners.get(p.runner_id)
        if runner is None:
            return f"runner {p.runner_id} is unknown"
        if runner.incarnation != p.incarnation:
            return f"runner {p.runner_id} restarted (incarnation {p.incarnation} -> {runner.incarnation})"
        if runner.status in GONE_STATUSES:
            detail = f": {runner.error_message}" if runner.error_message else ""
            return f"runner {p.runner_id} is {runner.status.removeprefix('Runner')}{detail}"
        for step in steps(len(inst.placements)):
            task = state.tasks.get(step_task_id(inst.instance_id, inst.attempt, step, p.runner_id))
            if task is not None and task.status in TERMINAL_TASK_STATUSES - {TaskStatus.COMPLETE}:
                return f"{task.task_type} on {p.runner_id} {task.status}: {task.error_type}: {task.error_message}"
    return None


def _advance(state: ClusterState, inst: InstanceView, config: PlannerConfig) -> list[Action]:
    reason = _failure(state, inst)
    drained = drained_placements(state, inst)
    if drained:
        if reason is None and inst.status == READY and inst.chats_in_flight:
            # Its chats finish first (the router gives it no more): failing it now would end
            # them in every API, which reads an instance's failure as the end of its chats.
            return []
        # Not the instance's fault: placed again elsewhere however many attempts it had.
        return [
            failed(
                inst,
                f"runner {', '.join(drained)} drained for maintenance: placed again elsewhere",
                final=False,
                drained=True,
            )
        ]
    if reason is not None:
        # Only attempts that never served count: a runner lost (a host cut, a restart) under a
        # Ready instance is the cluster's fault, and an instance that months of such faults
        # used up its attempts on would be gone for good.
        in_a_row = 0 if inst.status == READY else inst.failed_unready + 1
        final = in_a_row >= config.max_attempts
        if final:
            attempt_word = "attempt" if in_a_row == 1 else "attempts"
            reason = f"{reason} (gave up after {in_a_row} {attempt_word} in a row that never got Ready)"
        return [failed(inst, reason, final)]
    if inst.status == READY:
        return []
    world = len(inst.placements)
    for step in steps(world):
        ids = [step_task_id(inst.instance_id, inst.attempt, step, p.runner_id) for p in inst.placements]
        if all(state.tasks.get(i) is not None and state.tasks[i].status == TaskStatus.COMPLETE for i in ids):
            continue
        shards = split_after_download(state, inst) if step == LOAD else [p.shard for p in inst.placements]
        if isinstance(shards, str):
            return [failed(inst, shards, final=True)]
        return [
            SendTask(p.runner_id, _step_task(inst, step, rank, task_id, shards[rank], _ring_keys(state, inst)))
            for rank, (p, task_id) in enumerate(zip(inst.placements, ids, strict=True))
            if task_id not in state.tasks
        ]
    return []


def _ring_keys(state: ClusterState, inst: InstanceView) -> tuple[str, ...]:
    """The placed runners' ring keys, by rank (a group is placed only on runners that registered one)."""
    return tuple(state.runners[p.runner_id].ring_key for p in inst.placements)


def _step_task(inst: InstanceView, step: str, rank: int, task_id: str, shard: Shard, keys: tuple[str, ...]) -> Task:
    placement = inst.placements[rank]
    if step == DOWNLOAD:
        return DownloadModel(task_id=task_id, instance_id=inst.instance_id, shard=placement.shard)
    if step == CONNECT:
        group = Group(
            group_id=f"{inst.instance_id}.a{inst.attempt}",
            world_size=len(inst.placements),
            rank=rank,
            hosts=tuple(inst.hosts),
            keys=keys,
        )
        return ConnectToGroup(task_id=task_id, instance_id=inst.instance_id, group=group)
    if step == LOAD:
        return LoadModel(task_id=task_id, instance_id=inst.instance_id, shard=shard)
    assert step == WARMUP
    return StartWarmup(task_id=task_id, instance_id=inst.instance_id)


def _release(state: ClusterState) -> list[Action]:
    """UnloadModel for runners holding (or failed holding) what no live instance's current
    attempt placed on them: an instance that ended (failed or deleted), or an older attempt of
    one placed again (a task of that attempt still queued ran after the retry)."""
    serving = {
        (p.runner_id, p.incarnation)
        for inst in state.instances.values()
        if inst.status not in ENDED_STATUSES
        for p in inst.placements
    }
    actions: list[Action] = []
    for runner_id, instance_id in state.runner_instances.items():
        runner = state.runners.get(runner_id)
        inst = state.instances.get(instance_id)
        if runner is None or inst is None or runner.status not in UNLOADABLE_STATUSES:
            continue
        if (runner_id, runner.incarnation) in serving:
            continue
        task_id = step_task_id(instance_id, inst.attempt, UNLOAD, runner_id)
        sent = state.tasks.get(task_id)
        if sent is not None and sent.status in TERMINAL_TASK_STATUSES and runner.updated_seq > sent.updated_seq:
            # Held again since that unload (a stale task ran): unload again, under an id of this status.
            task_id = f"{task_id}.s{runner.updated_seq}"
            sent = state.tasks.get(task_id)
        if sent is None:
            actions.append(SendTask(runner_id, UnloadModel(task_id=task_id, instance_id=instance_id)))
    return actions
