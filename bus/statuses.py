"""Runner statuses (tagged by `type`) and task statuses.

A runner status's wire name is typed `RunnerStatusName` wherever it is held as a name (the
projection, the lifecycle table), so strict mypy (`strict_equality`) refuses a comparison with a
misspelt one.
"""

from __future__ import annotations

import enum
import typing
from typing import Final, Literal, cast

import msgspec


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class _Status(msgspec.Struct, frozen=True, tag_field="type", tag=True):
    pass


class RunnerIdle(_Status, frozen=True):
    pass


class RunnerDownloading(_Status, frozen=True):
    pass


class RunnerConnecting(_Status, frozen=True):
    pass


class RunnerConnected(_Status, frozen=True):
    pass


class RunnerLoading(_Status, frozen=True):
    pass


class RunnerLoaded(_Status, frozen=True):
    pass


class RunnerWarmingUp(_Status, frozen=True):
    pass


class RunnerReady(_Status, frozen=True):
    pass


class RunnerRunning(_Status, frozen=True):
    pass


class RunnerShuttingDown(_Status, frozen=True):
    pass


class RunnerShutdown(_Status, frozen=True):
    pass


class RunnerFailed(_Status, frozen=True):
    error_message: str = ""


class RunnerDeclaredLost(_Status, frozen=True, tag="RunnerLost"):
    """A runner a supervisor declared lost. Its wire name `RunnerLost` (DESIGN.md's) is also the
    event's that declares it (`events.RunnerLost`), hence the different Python name."""

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
    | RunnerDeclaredLost
)


# Every runner status's wire name, in the order declared above (checked against the tags below).
RunnerStatusName = Literal[
    "RunnerIdle",
    "RunnerDownloading",
    "RunnerConnecting",
    "RunnerConnected",
    "RunnerLoading",
    "RunnerLoaded",
    "RunnerWarmingUp",
    "RunnerReady",
    "RunnerRunning",
    "RunnerShuttingDown",
    "RunnerShutdown",
    "RunnerFailed",
    "RunnerLost",
]


UNREGISTERED: Final = "Unregistered"
# A runner's status in the projection: its last one written, or none yet.
RunnerState = RunnerStatusName | Literal["Unregistered"]
# An instance's status in the projection (projections/instances.py).
InstanceStatus = Literal["Placing", "Downloading", "Connecting", "Loading", "WarmingUp", "Ready", "Failed", "Deleted"]
# A routed chat's: Pending (no rank published yet), Routed, Refused (ChatRefused), Cancelled
# (CancelChat while pending), or the emitting rank's terminal task status.
ChatStatus = Literal["Pending", "Routed", "Refused", "Cancelled", "Complete", "Failed", "TimedOut"]


def status_name(status: RunnerStatus) -> RunnerStatusName:
    """The status's wire name (`RunnerReady`, `RunnerLost` ...)."""
    return cast(RunnerStatusName, type(status).__struct_config__.tag)


_BY_NAME: dict[str, type[RunnerStatus]] = {cls.__struct_config__.tag: cls for cls in typing.get_args(RunnerStatus)}
RUNNER_STATUS_NAMES: tuple[RunnerStatusName, ...] = typing.get_args(RunnerStatusName)
if RUNNER_STATUS_NAMES != tuple(_BY_NAME):
    raise ImportError(f"RunnerStatusName {RUNNER_STATUS_NAMES} is not the statuses' tags {tuple(_BY_NAME)}")


def runner_status(name: RunnerStatusName) -> RunnerStatus:
    """The status named `name`, with its fields' defaults."""
    return _BY_NAME[name]()


class TaskStatus(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    TIMED_OUT = "TimedOut"
    CANCELLED = "Cancelled"


TERMINAL_TASK_STATUSES = frozenset({TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED})
