"""Which runner status may follow which, derived from the lifecycle in `bus/lifecycle.py`."""

from __future__ import annotations

from typing import Final, Literal

from exojet.bus import lifecycle
from exojet.bus.statuses import RunnerStatusName

UNREGISTERED: Final = "Unregistered"
# A runner's status in the projection: its last one written, or none yet.
RunnerState = RunnerStatusName | Literal["Unregistered"]
FINAL_STATUSES = lifecycle.FINAL_STATUSES
# Statuses a runner may legitimately sit in for a long time.
RESTING_STATUSES = lifecycle.RESTING_STATUSES

ALLOWED: dict[RunnerState, frozenset[RunnerStatusName]] = {UNREGISTERED: frozenset({lifecycle.REGISTERED})}
ALLOWED.update((status, follow) for status, follow in lifecycle.transitions().items())


def transition_allowed(current: RunnerState, new: RunnerStatusName) -> bool:
    """True if the runner's lifecycle lets a runner go from `current` to `new`."""
    return new in ALLOWED.get(current, frozenset())
