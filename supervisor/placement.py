"""Placing an instance: which runners (projections/placing.py's rule), its shards, its group's ports.

Pure, like the planner that calls it (see supervisor/planner.py's docstring for layer counts).
"""

from __future__ import annotations

from collections.abc import Mapping

from exojet.bus.events import InstancePlaced, Placement
from exojet.bus.ids import step_task_id
from exojet.bus.results import DownloadResult, result_as
from exojet.bus.tasks import Shard
from exojet.bus.views import InstanceView, RunnerView
from exojet.projections.instances import DOWNLOAD, ENDED_STATUSES
from exojet.projections.placing import Waiting, choose_runners
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import PlannerConfig, WriteEvent, failed


def place(
    state: ClusterState, inst: InstanceView, busy: dict[str, str], catalog: Mapping[str, int], config: PlannerConfig
) -> WriteEvent | None:
    """InstancePlaced for a Placing instance (fenced), InstanceFailed if it can never be placed as
    asked, None while it waits (for runners, or a group port)."""
    runners = choose_runners(state, inst, busy)
    if isinstance(runners, Waiting):
        # Stays Placing until enough runners are free (the queries say why), unless it never can be.
        return failed(inst, runners.reason, final=True) if runners.final else None
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
            return failed(inst, problem, final=True)
        else:
            shards = split_layers(inst.model_id, n_layers, [r.memory_free for r in runners])
    hosts = _group_hosts(state, runners, config, attempt) if len(runners) > 1 else ()
    if hosts is None:
        return None  # every group port in the range is taken: wait for an instance to end
    busy.update((r.runner_id, inst.instance_id) for r in runners)
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


def split_after_download(state: ClusterState, inst: InstanceView) -> list[Shard] | str:
    """A group placed without a layer count: its shards from what the downloads reported, or why not."""
    placements = inst.placements
    if len(placements) == 1 or placements[0].shard.start_layer is not None:
        return [p.shard for p in placements]
    reported = set()
    for p in placements:
        task = state.tasks.get(step_task_id(inst.instance_id, inst.attempt, DOWNLOAD, p.runner_id))
        downloaded = result_as(DownloadResult, task.result) if task is not None else None
        reported.add(downloaded.n_layers if downloaded is not None else None)
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
