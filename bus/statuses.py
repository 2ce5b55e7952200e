"""Runner statuses (tagged by `type`) and task statuses."""

from __future__ import annotations

import enum

import msgspec


class _Status(msgspec.Struct, frozen=True, tag_field="type", tag=True):
    pass


class RunnerIdle(_Status):
    pass


class RunnerDownloading(_Status):
    pass


class RunnerConnecting(_Status):
    pass


class RunnerConnected(_Status):
    pass


class RunnerLoading(_Status):
    pass


class RunnerLoaded(_Status):
    pass


class RunnerWarmingUp(_Status):
    pass


class RunnerReady(_Status):
    pass


class RunnerRunning(_Status):
    pass


class RunnerShuttingDown(_Status):
    pass


class RunnerShutdown(_Status):
    pass


class RunnerFailed(_Status):
    error_message: str = ""


class RunnerLostStatus(_Status, tag="RunnerLost"):
    """Only the supervisor writes it (as part of a `RunnerLost` event)."""

    reason: str = ""


RunnerStatus = (
    RunnerIdle
    | RunnerDownloading
    | RunnerConnecting
    | RunnerConnected
    | RunnerLoading
    | RunnerLoaded
    | RunnerWarmingUp
    | RunnerReady
    | RunnerRunning
    | RunnerShuttingDown
    | RunnerShutdown
    | RunnerFailed
    | RunnerLostStatus
)


def status_name(status: RunnerStatus) -> str:
    """The status's wire name (`RunnerReady`, `RunnerLost` ...)."""
    return type(status).__struct_config__.tag  # type: ignore[return-value]


class TaskStatus(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    TIMED_OUT = "TimedOut"
    CANCELLED = "Cancelled"


TERMINAL_TASK_STATUSES = frozenset({TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED})
