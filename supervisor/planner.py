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

import msgspec

from exojet.bus.events import (
    PIPELINE_ENGINES,
    ChatRefused,
    InstanceFailed,
    InstancePlaced,
    Placement,
    SupervisorEvent,
)
from exojet.bus.ids import chat_task_id, step_task_id
from exojet.bus.statuses import TERMINAL_TASK_STATUSES
from exojet.bus.tasks import (
    ChatCompletion,
    ConnectToGroup,
    DownloadModel,
    Group,
    LoadModel,
    Shard,
    StartWarmup,
    Task,
    UnloadModel,
)
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
from exojet.projections.rules import FINAL_STATUSES
from exojet.projections.state import ClusterState, InstanceView, RoutedChatView, RunnerView

# A runner resting in one of these still holds (or failed holding) an ended
# instance's model or group: UnloadModel brings it back to Idle. A runner in a
# transient status (Loading, WarmingUp ...) is unloaded once it settles.
UNLOADABLE_STATUSES = frozenset({"RunnerConnected", "RunnerLoaded", "RunnerReady", "RunnerFailed"})
# A runner that is gone, or going, cannot serve its instance any more.
GONE_STATUSES = FINAL_STATUSES | {"RunnerShuttingDown", "RunnerFailed"}
EMPTY_CATALOG: Mapping[str, int] = {}


class PlannerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of the planner; every supervisor of a cluster should use the same."""

    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    # Group ports are taken from [port_base, port_base + port_count).
    port_base: int = 52_400
    port_count: int = 600
    # Routed chats that may wait in a Ready instance's runner queue beyond those it serves at
    # once; a chat no instance of its model has room for is refused (ChatRefused).
    max_chats_per_instance: int = 64


DEFAULT_CONFIG = PlannerConfig()


class SendTask(msgspec.Struct, frozen=True):
    runner_id: str
    task: Task


class WriteEvent(msgspec.Struct, frozen=True):
    event: SupervisorEvent
    # Expected last sequence of `exo.events.supervisor`, or None for no fence.
    fence: int | None = None


class RetryWait(msgspec.Struct, frozen=True):
    instance_id: str
    attempt: int
    delay: float


Action = SendTask | WriteEvent | RetryWait


def plan(
    state: ClusterState, catalog: Mapping[str, int] = EMPTY_CATALOG, config: PlannerConfig = DEFAULT_CONFIG
) -> list[Action]:
    """What to publish now, given the projection (see the module docstring)."""
    actions: list[Action] = []
    busy = _busy_runners(state)
    placed_one = False
    for inst in state.instances.values():
        if inst.status == PLACING and not inst.placements:
            # One placement per plan: its fence would fail any second one anyway.
            if not placed_one and (action := _place(state, inst, busy, catalog, config)) is not None:
                actions.append(action)
                placed_one = True
        elif inst.status == FAILED and not inst.gave_up:
            actions.append(RetryWait(inst.instance_id, inst.attempt, backoff(inst.attempt, config)))
        elif inst.status not in ENDED_STATUSES:
            actions.extend(_advance(state, inst, config))
    actions.extend(_release(state))
    actions.extend(_route_chats(state, config))
    return actions


def backoff(attempt: int, config: PlannerConfig) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, 4 ... capped)."""
    return min(config.backoff_base_s * 2 ** max(attempt - 1, 0), config.backoff_cap_s)


def _busy_runners(state: ClusterState) -> set[str]:
    """Runners serving the current attempt of an instance that has not ended."""
    busy = set()
    for runner_id, instance_id in state.runner_instances.items():
        inst = state.instances.get(instance_id)
        if inst is not None and inst.status not in ENDED_STATUSES and _placement(inst, runner_id) is not None:
            busy.add(runner_id)
    return busy


def _placement(inst: InstanceView, runner_id: str) -> Placement | None:
    return next((p for p in inst.placements if p.runner_id == runner_id), None)


def _place(
    state: ClusterState, inst: InstanceView, busy: set[str], catalog: Mapping[str, int], config: PlannerConfig
) -> WriteEvent | None:
    runners = _choose_runners(state, inst, busy)
    if runners is None:
        return None  # stays Placing until enough runners are free
    attempt = inst.attempt + 1
    if len(runners) == 1:
        shards = [Shard(model_id=inst.model_id)]
    else:
        n_layers = inst.n_layers or catalog.get(inst.model_id)
        if n_layers is None:
            # Split once the runners' downloads say how many layers there are.
            world = len(runners)
            shards = [Shard(model_id=inst.model_id, device_rank=r, world_size=world) for r in range(world)]
        elif (problem := _too_few_layers(inst.model_id, n_layers, len(runners))) is not None:
            return _failed(inst, problem, final=True)
        else:
            shards = split_layers(inst.model_id, n_layers, [r.memory_free for r in runners])
    hosts = _group_hosts(state, runners, config, attempt) if len(runners) > 1 else ()
    if hosts is None:
        return None  # every group port in the range is taken: wait for an instance to end
    busy.update(r.runner_id for r in runners)
    placements = tuple(
        Placement(runner_id=r.runner_id, shard=s, incarnation=r.incarnation)
        for r, s in zip(runners, shards, strict=True)
    )
    event = InstancePlaced(
        event_id=f"{inst.instance_id}:placed:{attempt}",
        instance_id=inst.instance_id,
        model_id=inst.model_id,
        placements=placements,
        attempt=attempt,
        hosts=hosts,
    )
    return WriteEvent(event, fence=state.supervisor_seq)


def _too_few_layers(model_id: str, n_layers: int, world: int) -> str | None:
    return f"{model_id} has {n_layers} layers, fewer than the {world} runners asked for" if n_layers < world else None


def _split_after_download(state: ClusterState, inst: InstanceView) -> list[Shard] | str:
    """A group placed without a layer count: its shards from what the downloads reported, or why not."""
    placements = inst.placements
    if len(placements) == 1 or placements[0].shard.start_layer is not None:
        return [p.shard for p in placements]
    reported = set()
    for p in placements:
        task = state.tasks.get(step_task_id(inst.instance_id, inst.attempt, DOWNLOAD, p.runner_id))
        result = task.result if task is not None and task.result else {}
        reported.add(result.get("n_layers"))
    n_layers = reported.pop() if len(reported) == 1 else None
    if not isinstance(n_layers, int) or n_layers < 1:
        return (
            f"cannot split {inst.model_id} over {len(placements)} runners: its downloads reported no layer count "
            "(runners older than the report, or a config.json without num_hidden_layers); pass n_layers in "
            "PlaceInstance or give the supervisor --models-dir holding the model"
        )
    if (problem := _too_few_layers(inst.model_id, n_layers, len(placements))) is not None:
        return problem
    memory = [state.runners[p.runner_id].memory_free if p.runner_id in state.runners else 0 for p in placements]
    return split_layers(inst.model_id, n_layers, memory)


def _choose_runners(state: ClusterState, inst: InstanceView, busy: set[str]) -> list[RunnerView] | None:
    pipelined = inst.min_runners > 1
    # A runner with a task not yet answered (running, its status maybe not written yet, or
    # still queued: a step of an attempt that failed meanwhile) is not free: that task may
    # yet take it into a group or load a model.
    answering = {state.tasks[t].runner_id for t in state.unfinished if t in state.tasks}

    def free(runner: RunnerView | None) -> bool:
        # Idle only: a Failed runner needs a person (or a restart) before it serves again.
        # A pipeline group only on runners with an engine that can join one.
        return (
            runner is not None
            and runner.status == "RunnerIdle"
            and runner.runner_id not in busy
            and runner.runner_id not in state.drained
            and runner.runner_id not in answering
            and (not pipelined or can_join_group(runner))
        )

    if inst.requested_runners:
        chosen = [state.runners.get(r) for r in inst.requested_runners]
        return [r for r in chosen if r is not None] if all(free(r) for r in chosen) else None
    candidates = [r for r in state.runners.values() if free(r)]
    if len(candidates) < inst.min_runners:
        return None
    candidates.sort(key=lambda r: (-r.memory_free, r.runner_id))
    return candidates[: inst.min_runners]


def can_join_group(runner: RunnerView) -> bool:
    """Whether the runner has an engine that can run a shard in a pipeline group
    (a runner that reported no engines predates llama.cpp: MLX only)."""
    return not runner.engines or any(e in PIPELINE_ENGINES for e in runner.engines)


def split_layers(model_id: str, n_layers: int, memory: list[int]) -> list[Shard]:
    """Contiguous layer ranges in proportion to `memory`, at least one layer each
    (equal shares when no runner reports memory); rank r gets the r-th range."""
    world = len(memory)
    weights = memory if sum(memory) > 0 else [1] * world
    total = sum(weights)
    exact = [n_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    # Largest remainders take the layers left over; the largest shares give
    # back what the one-layer minimum took.
    order = sorted(range(world), key=lambda i: (-(exact[i] - int(exact[i])), i))
    i = 0
    while sum(counts) < n_layers:
        counts[order[i % world]] += 1
        i += 1
    while sum(counts) > n_layers:
        biggest = max(range(world), key=lambda j: (counts[j], -j))
        counts[biggest] -= 1
    shards, start = [], 0
    for rank, count in enumerate(counts):
        shards.append(
            Shard(
                model_id=model_id,
                start_layer=start,
                end_layer=start + count,
                n_layers=n_layers,
                device_rank=rank,
                world_size=world,
            )
        )
        start += count
    return shards


def _group_hosts(
    state: ClusterState, runners: list[RunnerView], config: PlannerConfig, attempt: int
) -> tuple[str, ...] | None:
    used: set[int] = set()
    for other in state.instances.values():
        if other.status not in ENDED_STATUSES:
            used.update(int(h.rsplit(":", 1)[1]) for h in other.hosts)
    free = [p for p in range(config.port_base, config.port_base + config.port_count) if p not in used]
    if len(free) < len(runners):
        return None
    # Each attempt takes the next free ports: one an attempt found taken on its host (another
    # program listening, or an outgoing connection's ephemeral port) is not tried again.
    start = (attempt - 1) * len(runners) % len(free)
    ports = (free + free)[start : start + len(runners)]
    return tuple(f"{r.address or '127.0.0.1'}:{port}" for r, port in zip(runners, ports, strict=True))


def _failed(inst: InstanceView, reason: str, final: bool) -> WriteEvent:
    event = InstanceFailed(
        event_id=f"{inst.instance_id}:failed:{inst.attempt}",
        instance_id=inst.instance_id,
        reason=reason,
        attempt=inst.attempt,
        final=final,
    )
    return WriteEvent(event)


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
            if task is not None and task.status in ("Failed", "TimedOut", "Cancelled"):
                return f"{task.task_type} on {p.runner_id} {task.status}: {task.error_type}: {task.error_message}"
    return None


def _advance(state: ClusterState, inst: InstanceView, config: PlannerConfig) -> list[Action]:
    drained = [p.runner_id for p in inst.placements if p.runner_id in state.drained]
    if drained:
        # Not the instance's fault: placed again elsewhere however many attempts it had.
        return [_failed(inst, f"runner {', '.join(drained)} drained for maintenance: moving", final=False)]
    if (reason := _failure(state, inst)) is not None:
        attempt_word = "attempt" if config.max_attempts == 1 else "attempts"
        final = inst.attempt >= config.max_attempts
        if final:
            reason = f"{reason} (gave up after {inst.attempt} {attempt_word})"
        return [_failed(inst, reason, final)]
    if inst.status == READY:
        return []
    world = len(inst.placements)
    for step in steps(world):
        ids = [step_task_id(inst.instance_id, inst.attempt, step, p.runner_id) for p in inst.placements]
        if all(state.tasks.get(i) is not None and state.tasks[i].status == "Complete" for i in ids):
            continue
        shards = _split_after_download(state, inst) if step == LOAD else [p.shard for p in inst.placements]
        if isinstance(shards, str):
            return [_failed(inst, shards, final=True)]
        return [
            SendTask(p.runner_id, _step_task(inst, step, rank, task_id, shards[rank], _ring_keys(state, inst)))
            for rank, (p, task_id) in enumerate(zip(inst.placements, ids, strict=True))
            if task_id not in state.tasks
        ]
    return []


def _ring_keys(state: ClusterState, inst: InstanceView) -> tuple[str, ...]:
    """The placed runners' ring keys, by rank; none if one runner has none (it predates them)."""
    keys = tuple(state.runners[p.runner_id].ring_key if p.runner_id in state.runners else "" for p in inst.placements)
    return keys if all(keys) else ()


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


def chat_capacity(state: ClusterState, inst: InstanceView) -> int:
    """Chats an instance serves at once: its runner's capacity for the model; 1 for a pipeline
    group (its ranks pull their tasks independently, so they could not keep step)."""
    if len(inst.placements) != 1:
        return 1
    runner = state.runners.get(inst.placements[0].runner_id)
    return runner.chat_capacity if runner is not None else 1


def _route_chats(state: ClusterState, config: PlannerConfig) -> list[Action]:
    """Each pending chat to the Ready instance of its model with the most free capacity; with none
    free, to the one with the shortest queue, where it waits in its runner's queue (routed: an API
    waiting for it to be routed is answered at once), up to `max_chats_per_instance` waiting per
    instance; beyond that it is refused."""
    actions: list[Action] = []
    ready = [i for i in state.instances.values() if i.status == READY]
    load = {i.instance_id: i.chats_in_flight for i in ready}
    capacity = {i.instance_id: chat_capacity(state, i) for i in ready}
    for chat_id in state.pending_chats:
        chat = state.chats[chat_id]
        if chat.request is None:
            continue
        if chat.instance_id is None:
            candidates = [i for i in load if chat.model_id is None or state.instances[i].model_id == chat.model_id]
            if not candidates:
                continue  # waits for a Ready instance of its model
            target = min(candidates, key=lambda i: (load[i] - capacity[i], i))
            if load[target] >= capacity[target] + config.max_chats_per_instance:
                actions.append(_refuse(chat, len(candidates), config.max_chats_per_instance))
                continue
            load[target] += 1
            actions.append(_chat_task(state, chat, state.instances[target], 0))
        elif (inst := state.instances.get(chat.instance_id)) is not None and inst.status == READY:
            # Ranks after 0 follow the instance that rank 0's task (in the log) names.
            actions.extend(
                _chat_task(state, chat, inst, rank)
                for rank in range(1, len(inst.placements))
                if chat_task_id(chat_id, rank) not in state.tasks
            )
    return actions


def _refuse(chat: RoutedChatView, instances: int, limit: int) -> WriteEvent:
    model = chat.model_id or "any model"
    event = ChatRefused(
        event_id=f"{chat.chat_id}:refused",
        chat_id=chat.chat_id,
        error_type="QueueFull",
        reason=f"all {instances} Ready instance(s) of {model} serve as many chats as they can and {limit} "
        "more wait for each; retry shortly",
    )
    return WriteEvent(event)


def _chat_task(state: ClusterState, chat: RoutedChatView, inst: InstanceView, rank: int) -> SendTask:
    request = chat.request
    assert request is not None
    task = ChatCompletion(
        task_id=chat_task_id(chat.chat_id, rank),
        instance_id=inst.instance_id,
        messages=request.messages,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop,
        raw=request.raw,
        stream_id=chat.chat_id,
        emit_rank=0,
    )
    return SendTask(inst.placements[rank].runner_id, task)
