"""Which runner status may follow which, derived from the lifecycle in `bus/lifecycle.py`."""

from __future__ import annotations

from exojet.bus import lifecycle

UNREGISTERED = "Unregistered"
FINAL_STATUSES = lifecycle.FINAL_STATUSES
# Statuses a runner may legitimately sit in for a long time.
RESTING_STATUSES = lifecycle.RESTING_STATUSES

ALLOWED: dict[str, frozenset[str]] = {UNREGISTERED: frozenset({lifecycle.REGISTERED}), **lifecycle.transitions()}


def transition_allowed(current: str, new: str) -> bool:
    """True if the runner's lifecycle lets a runner go from `current` to `new`."""
    return new in ALLOWED.get(current, frozenset())
