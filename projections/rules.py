"""Which runner status may follow which: DESIGN.md's state machine, as data."""

from __future__ import annotations

UNREGISTERED = "Unregistered"
FINAL_STATUSES = frozenset({"RunnerShutdown", "RunnerLost"})
# Statuses a runner may legitimately sit in for a long time.
RESTING_STATUSES = frozenset({"RunnerIdle", "RunnerConnected", "RunnerLoaded", "RunnerReady", "RunnerFailed"})

_ANY_LIVE = ("RunnerFailed", "RunnerShuttingDown")

ALLOWED: dict[str, frozenset[str]] = {
    UNREGISTERED: frozenset({"RunnerIdle"}),
    "RunnerIdle": frozenset({"RunnerDownloading", "RunnerConnecting", "RunnerLoading", *_ANY_LIVE}),
    # Downloading returns where it came from (Idle after Failed).
    "RunnerDownloading": frozenset({"RunnerIdle", "RunnerConnected", *_ANY_LIVE}),
    "RunnerConnecting": frozenset({"RunnerConnected", *_ANY_LIVE}),
    # -> Idle: UnloadModel.
    "RunnerConnected": frozenset({"RunnerDownloading", "RunnerLoading", "RunnerIdle", *_ANY_LIVE}),
    "RunnerLoading": frozenset({"RunnerLoaded", *_ANY_LIVE}),
    "RunnerLoaded": frozenset({"RunnerWarmingUp", "RunnerIdle", *_ANY_LIVE}),
    "RunnerWarmingUp": frozenset({"RunnerReady", *_ANY_LIVE}),
    "RunnerReady": frozenset({"RunnerRunning", "RunnerIdle", *_ANY_LIVE}),
    "RunnerRunning": frozenset({"RunnerReady", *_ANY_LIVE}),
    "RunnerFailed": frozenset({"RunnerDownloading", "RunnerConnecting", "RunnerIdle", *_ANY_LIVE}),
    "RunnerShuttingDown": frozenset({"RunnerShutdown", "RunnerFailed"}),
    "RunnerShutdown": frozenset(),
    "RunnerLost": frozenset(),
}


def transition_allowed(current: str, new: str) -> bool:
    """True if DESIGN.md's state machine lets a runner go from `current` to `new`."""
    return new in ALLOWED.get(current, frozenset())
