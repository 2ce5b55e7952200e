"""What must hold, whatever the seed did.

After every stored message (`forbidden`, on the projection of the whole log):
no runner placed in two live instances, no task answered twice, no runner
transition the lifecycle does not allow, no event of an incarnation that was
already replaced. At the end, once every fault has healed and the cluster has
settled (`at_end`): every task has its terminal status, every instance is
Ready, or Failed with a reason, or Deleted, and every supervisor's projection
equals the projection of the whole log (same state hash), however it got there
(its lag, its restarts, the snapshot it started from).
"""

from __future__ import annotations

from collections.abc import Iterable

from exojet.bus.statuses import TERMINAL_TASK_STATUSES
from exojet.bus.views import Anomaly
from exojet.projections.instances import DELETED, FAILED, READY
from exojet.projections.state import ClusterState, state_hash

# Anomalies a correct cluster can produce, from supervisors planning on views of
# different ages (documented in projections/instances.py): a chat refused after
# another supervisor routed it, an instance event for an attempt that is over.
ALLOWED_ANOMALIES = frozenset({"StaleChatRefusal", "StaleInstanceEvent"})


def forbidden(anomaly: Anomaly) -> str | None:
    """Why `anomaly` breaks an invariant, or None if a correct cluster may show it."""
    if anomaly.kind in ALLOWED_ANOMALIES:
        return None
    return f"{anomaly.kind}: {anomaly.detail}"


def at_end(truth: ClusterState, projections: Iterable[tuple[str, ClusterState]]) -> list[str]:
    """Every end-of-run invariant that does not hold, in words."""
    problems = []
    for task in truth.tasks.values():
        if task.status not in TERMINAL_TASK_STATUSES:
            problems.append(f"task {task.task_id} ({task.task_type} on {task.runner_id}) is still {task.status}")
    for inst in truth.instances.values():
        if inst.status == READY or inst.status == DELETED:
            continue
        if inst.status != FAILED or not inst.reason or not inst.gave_up:
            problems.append(f"instance {inst.instance_id} ended {inst.status} (attempt {inst.attempt}): {inst.reason}")
    expected = state_hash(truth)
    for name, state in projections:
        if state.seq != truth.seq:
            problems.append(f"supervisor {name} folded up to seq {state.seq}, the log ends at {truth.seq}")
        elif state_hash(state) != expected:
            problems.append(f"supervisor {name} disagrees with the log's projection at seq {state.seq}")
    return problems
