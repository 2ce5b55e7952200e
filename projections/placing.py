"""Which runners an instance can be placed on, and why not yet: the one rule the planner
places by (supervisor/placement.py) and every reader explains a Placing instance with
(the supervisors' queries, `exojet state`, `place --wait`, `explain`, the page).

Pure: it reads the projection only. Nothing here is written to the log: a reason to wait
is as current as the projection it is read from.
"""

from __future__ import annotations

import msgspec

from exojet.bus.events import PIPELINE_ENGINES
from exojet.bus.views import InstanceView, RunnerView
from exojet.projections.instances import ENDED_STATUSES, PLACING
from exojet.projections.state import ClusterState


class Waiting(msgspec.Struct, frozen=True):
    """The instance cannot be placed now: `reason` says why; `final`: nor ever, as asked."""

    reason: str
    final: bool = False


def busy_runners(state: ClusterState) -> dict[str, str]:
    """Runners serving the current attempt of an instance that has not ended: runner -> instance."""
    busy = {}
    for runner_id, instance_id in state.runner_instances.items():
        inst = state.instances.get(instance_id)
        if inst is not None and inst.status not in ENDED_STATUSES:
            if any(p.runner_id == runner_id for p in inst.placements):
                busy[runner_id] = instance_id
    return busy


def drained_placements(state: ClusterState, inst: InstanceView) -> list[str]:
    """The runners of the instance drained for maintenance: it takes no new chat, and moves
    elsewhere once the chats it was given have ended (the planner, the router)."""
    return [p.runner_id for p in inst.placements if p.runner_id in state.drained]


def group_problem(runner: RunnerView) -> str | None:
    """Why the runner cannot take a shard in a pipeline group (None: it can)."""
    if not any(e in PIPELINE_ENGINES for e in runner.engines):
        return f"{runner.runner_id} has no engine that joins a pipeline group ({', '.join(sorted(PIPELINE_ENGINES))})"
    if not runner.ring_key:
        return f"NoRingKey: {runner.runner_id} registered no ring key, so its group handshake cannot be signed"
    return None


def unfit(runner: RunnerView, group: bool) -> str | None:
    """Why the runner can never take this instance as it registered (None: it can)."""
    if not runner.engines:
        return f"NoEngines: {runner.runner_id} registered no engines it can load a model on"
    return group_problem(runner) if group else None


def not_free(state: ClusterState, runner: RunnerView, busy: dict[str, str], answering: set[str]) -> str | None:
    """Why the runner is not free to place anything on now (None: it is)."""
    rid = runner.runner_id
    if rid in state.drained:
        return f"{rid} is drained (`exojet undrain {rid}`)"
    if rid in busy:
        held = state.instances[busy[rid]]
        return f"{rid} serves {held.instance_id} ({held.model_id}, {held.status})"
    # A runner with a task not yet answered (running, or still queued: a step of an attempt that
    # failed meanwhile) is not free: that task may yet take it into a group or load a model.
    if rid in answering:
        return f"{rid} is still answering a task"
    if runner.status != "RunnerIdle":
        # Idle only: a Failed runner needs a person (or a restart) before it serves again.
        return f"{rid} is {runner.status.removeprefix('Runner')}"
    return None


def choose_runners(state: ClusterState, inst: InstanceView, busy: dict[str, str]) -> list[RunnerView] | Waiting:
    """The runners to place `inst` on now (its requested ones, else the freest Idle ones), or why not."""
    group = inst.min_runners > 1
    answering = {state.tasks[t].runner_id for t in state.unfinished if t in state.tasks}
    if inst.requested_runners:
        chosen = []
        for rid in inst.requested_runners:
            runner = state.runners.get(rid)
            if runner is None:
                return Waiting(f"waiting for runner {rid}, which has not registered")
            if (problem := unfit(runner, group)) is not None:
                return Waiting(problem, final=True)
            if (problem := not_free(state, runner, busy, answering)) is not None:
                return Waiting(f"waiting for runner {problem}")
            chosen.append(runner)
        return chosen
    candidates, why = [], []
    for runner in sorted(state.runners.values(), key=lambda r: r.runner_id):
        if runner.status in ("RunnerShutdown", "RunnerLost"):
            continue
        problem = unfit(runner, group) or not_free(state, runner, busy, answering)
        if problem is None:
            candidates.append(runner)
        else:
            why.append(problem)
    if len(candidates) >= inst.min_runners:
        candidates.sort(key=lambda r: (-r.memory_free, r.runner_id))
        return candidates[: inst.min_runners]
    wanted = "a free runner" if inst.min_runners == 1 else f"{inst.min_runners} free runners"
    if not why:
        return Waiting(f"waiting for {wanted}: none has registered (start one: `exojet runner` or `exojet up`)")
    have = f" ({len(candidates)} free)" if candidates else ""
    return Waiting(f"waiting for {wanted}{have}: {'; '.join(why)}")


def waiting_reason(state: ClusterState, inst: InstanceView) -> str | None:
    """Why a Placing instance has not been placed yet (None: it is not waiting for runners)."""
    if inst.status != PLACING or inst.placements:
        return None
    chosen = choose_runners(state, inst, busy_runners(state))
    return chosen.reason if isinstance(chosen, Waiting) else None


def placing_waits(state: ClusterState) -> dict[str, str]:
    """Every Placing instance's reason to wait (instance id -> reason)."""
    return {i.instance_id: r for i in state.instances.values() if (r := waiting_reason(state, i)) is not None}


def shown_reason(reason: str | None, waiting: str | None) -> str | None:
    """An instance's reason as shown: what it waits for (and why its last attempt failed), else its status's."""
    if waiting is None:
        return reason
    return waiting + (f" (last attempt: {reason})" if reason else "")
