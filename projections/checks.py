"""What a debugging session wants flagged: anomalies, unfinished tasks, stuck runners."""

from __future__ import annotations

import msgspec

from exojet.bus.statuses import TERMINAL_TASK_STATUSES, UNREGISTERED
from exojet.bus.views import Anomaly, RunnerView, TaskView
from exojet.projections.rules import FINAL_STATUSES, RESTING_STATUSES
from exojet.projections.state import ClusterState


class CheckReport(msgspec.Struct):
    anomalies: list[Anomaly]
    unfinished_tasks: list[TaskView]
    stuck_runners: list[RunnerView]

    @property
    def ok(self) -> bool:
        return not (self.anomalies or self.unfinished_tasks or self.stuck_runners)


def check(state: ClusterState) -> CheckReport:
    """Anomalies, tasks with no terminal status, and runners last seen mid-transition."""
    return CheckReport(
        anomalies=list(state.anomalies),
        unfinished_tasks=[t for t in state.tasks.values() if t.status not in TERMINAL_TASK_STATUSES],
        stuck_runners=[
            r
            for r in state.runners.values()
            if r.status not in RESTING_STATUSES and r.status not in FINAL_STATUSES and r.status != UNREGISTERED
        ],
    )
