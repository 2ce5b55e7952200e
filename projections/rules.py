"""Which runner status may follow which, derived from the lifecycle in `bus/lifecycle.py`."""

from __future__ import annotations

from exojet.bus import lifecycle
from exojet.bus.statuses import UNREGISTERED, RunnerState, RunnerStatusName

FINAL_STATUSES = lifecycle.FINAL_STATUSES
# Statuses a runner may legitimately sit in for a long time.
RESTING_STATUSES = lifecycle.RESTING_STATUSES

ALLOWED: dict[RunnerState, frozenset[RunnerStatusName]] = {UNREGISTERED: frozenset({lifecycle.REGISTERED})}
ALLOWED.update((status, follow) for status, follow in lifecycle.transitions().items())


def transition_allowed(current: RunnerState, new: RunnerStatusName) -> bool:
    """True if the runner's lifecycle lets a runner go from `current` to `new`."""
    return new in ALLOWED.get(current, frozenset())
