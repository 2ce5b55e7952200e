"""The runner's lifecycle, written down once: DESIGN.md's state-machine table
(plus UnloadModel, see docs/design-notes.md) as data.

For each task: the statuses that accept it, the status the runner works in, where
success ends and where failure ends. The runner's checks (`runner/state_machine.py`),
the projection's transition rules (`projections/rules.py`) and its stuck-runner
check (`projections/checks.py`) are all derived from `LIFECYCLE`, and a test renders
DESIGN.md's table from it, so the three can never drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from exojet.bus.statuses import RUNNER_STATUS_NAMES, RunnerStatusName

IDLE: Final = "RunnerIdle"
DOWNLOADING: Final = "RunnerDownloading"
CONNECTING: Final = "RunnerConnecting"
CONNECTED: Final = "RunnerConnected"
LOADING: Final = "RunnerLoading"
LOADED: Final = "RunnerLoaded"
WARMING_UP: Final = "RunnerWarmingUp"
READY: Final = "RunnerReady"
RUNNING: Final = "RunnerRunning"
SHUTTING_DOWN: Final = "RunnerShuttingDown"
SHUTDOWN: Final = "RunnerShutdown"
FAILED: Final = "RunnerFailed"
# Written by a supervisor only (as part of a `RunnerLost` event), never by the runner.
LOST: Final = "RunnerLost"

ALL_STATUSES = RUNNER_STATUS_NAMES
# A registration (a new incarnation) always starts here.
REGISTERED: Final = IDLE
# After these an incarnation writes nothing more.
FINAL_STATUSES: frozenset[RunnerStatusName] = frozenset({SHUTDOWN, LOST})
LIVE_STATUSES: tuple[RunnerStatusName, ...] = tuple(s for s in ALL_STATUSES if s not in FINAL_STATUSES)


@dataclass(frozen=True)
class TaskLifecycle:
    """One row of the state machine."""

    task: str
    # The statuses a runner accepts the task in; `None`: any live status.
    accepted_in: tuple[RunnerStatusName, ...] | None
    # The status written before the work starts; `None`: the task has none.
    working: RunnerStatusName | None
    # Where success ends; `None`: back in the status the task was accepted in ...
    success: RunnerStatusName | None
    # ... except from these statuses (accepted in -> ends in).
    success_from: Mapping[RunnerStatusName, RunnerStatusName] = field(default_factory=dict)
    # Where an engine or download error ends.
    failure: RunnerStatusName = FAILED
    # Why a status accepts the task, where DESIGN.md says so.
    accepted_because: Mapping[RunnerStatusName, str] = field(default_factory=dict)
    # What must also hold, beyond the status (the runner checks it before any transition).
    requires: str | None = None
    # Success ends the runner process.
    ends_process: bool = False

    def accepts(self, status: str) -> bool:
        """True if a runner in `status` may run this task."""
        return self.accepted_in is None or status in self.accepted_in

    def accepting_statuses(self) -> tuple[RunnerStatusName, ...]:
        """The statuses a runner can accept the task in: `any` is every live status but the task's own."""
        if self.accepted_in is not None:
            return self.accepted_in
        return tuple(s for s in LIVE_STATUSES if s != self.working)

    def succeeded(self, before: RunnerStatusName) -> RunnerStatusName:
        """Where the runner ends after success, given the status it accepted the task in."""
        return self.success_from.get(before, self.success or before)


LIFECYCLE: dict[str, TaskLifecycle] = {
    t.task: t
    for t in (
        TaskLifecycle(
            "DownloadModel",
            (IDLE, CONNECTED, FAILED),
            DOWNLOADING,
            None,
            # A Failed runner that fetched its model is usable again.
            success_from={FAILED: IDLE},
        ),
        TaskLifecycle("ConnectToGroup", (IDLE, FAILED), CONNECTING, CONNECTED),
        TaskLifecycle(
            "LoadModel",
            (IDLE, CONNECTED),
            LOADING,
            LOADED,
            accepted_because={IDLE: "single runner", CONNECTED: "group"},
            requires="model present on disk",
        ),
        TaskLifecycle("StartWarmup", (LOADED,), WARMING_UP, READY),
        TaskLifecycle("ChatCompletion", (READY,), RUNNING, READY),
        TaskLifecycle("UnloadModel", (CONNECTED, LOADED, READY, FAILED), None, IDLE),
        TaskLifecycle("Shutdown", None, SHUTTING_DOWN, SHUTDOWN, ends_process=True),
    )
}

# Statuses a runner may sit in for a long time: where tasks start and end.
RESTING_STATUSES = (
    frozenset(
        {REGISTERED}
        | {s for t in LIFECYCLE.values() if t.accepted_in is not None for s in t.accepted_in}
        | {t.succeeded(s) for t in LIFECYCLE.values() for s in t.accepting_statuses()}
        | {t.failure for t in LIFECYCLE.values()}
    )
    - FINAL_STATUSES
    - {t.working for t in LIFECYCLE.values()}
)


def transitions() -> dict[RunnerStatusName, frozenset[RunnerStatusName]]:
    """status -> the statuses that may follow it (registration aside), for every task's row."""
    allowed: dict[RunnerStatusName, set[RunnerStatusName]] = {s: set() for s in ALL_STATUSES}
    for t in LIFECYCLE.values():
        for before in t.accepting_statuses():
            ends = {t.succeeded(before), t.failure}
            if t.working is None:
                allowed[before] |= ends
            else:
                allowed[before].add(t.working)
                allowed[t.working] |= ends
    return {s: frozenset(follow) for s, follow in allowed.items()}
