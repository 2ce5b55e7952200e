"""Events: what happened, written by runners and supervisors into `EXO_LOG`.

`at` is wall-clock time for people reading the log; the projection never reads it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.bus.formats import LogMessage
from exojet.bus.statuses import RunnerStatus, TaskStatus
from exojet.bus.tasks import Shard


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class _RunnerEvent(LogMessage, frozen=True, kw_only=True):
    event_id: str
    runner_id: str
    incarnation: int = 0
    at: float = 0.0


# The engines that can run a shard of a model in a pipeline group (MLX's ring backend).
PIPELINE_ENGINES: frozenset[str] = frozenset({"mlx"})


class RunnerRegistered(_RunnerEvent, frozen=True):
    host: str = ""
    pid: int = 0
    memory_total: int = 0
    memory_free: int = 0
    engine: str = ""
    # How the engine runs on this machine (its BLAS, its weights policy), and why.
    engine_setup: str = ""
    # Every engine the runner can load a model on, fastest first ("mlx", "llamacpp");
    # empty from runners older than this field (they had MLX only).
    engines: tuple[str, ...] = ()
    version: str = ""
    # The address other ranks reach this runner on, for pipeline groups.
    address: str = "127.0.0.1"
    # The public nkeys key this process proves its rank in a pipeline ring with
    # (`runner/ring_identity.py`); empty from runners older than the field.
    ring_key: str = ""


class RunnerStatusUpdated(_RunnerEvent, frozen=True):
    runner_status: RunnerStatus


class TaskStatusUpdated(_RunnerEvent, frozen=True):
    task_id: str
    task_status: TaskStatus
    task_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None


class DownloadProgress(_RunnerEvent, frozen=True):
    model_id: str
    downloaded_bytes: int
    total_bytes: int
    completed_files: int
    total_files: int


class LoadProgress(_RunnerEvent, frozen=True):
    """Layers of a LoadModel's shard in memory so far. The runner sends the first, then
    at most about two a second, and always the last (`layers_loaded == layers_total`),
    so a model of hundreds of layers does not flood the log."""

    model_id: str
    task_id: str
    layers_loaded: int
    layers_total: int


class RunnerLost(_RunnerEvent, frozen=True):
    """Written by a supervisor on the lost runner's own subject (fenced)."""

    reason: str = ""
    supervisor_id: str = ""


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class _SupervisorEvent(LogMessage, frozen=True, kw_only=True):
    event_id: str
    supervisor_id: str = ""
    at: float = 0.0


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: str
    shard: Shard
    # The runner's incarnation when placed: a restarted runner has lost the
    # instance's work, which the planner detects by comparing incarnations.
    incarnation: int = 0


class InstancePlaced(_SupervisorEvent, frozen=True):
    instance_id: str
    model_id: str
    placements: tuple[Placement, ...]
    attempt: int = 0
    # Ring ports for multi-runner instances, `hosts[rank]`.
    hosts: tuple[str, ...] = ()


class InstanceFailed(_SupervisorEvent, frozen=True):
    instance_id: str
    reason: str
    attempt: int = 0
    # True when no further attempt will be made (retry limit reached, or a
    # failure that another attempt cannot fix).
    final: bool = False
    # True when the attempt was moved off a drained runner: no failure of the instance's own, so
    # it does not count toward the retry limit and its backoff (written since 0.2.0).
    drained: bool = False


class InstanceRetryDue(_SupervisorEvent, frozen=True):
    """A failed attempt's backoff has elapsed: the instance may be placed again.

    Written by a supervisor's reconciler from its clock, so that replaying the
    log never depends on when it is replayed.
    """

    instance_id: str
    attempt: int


class InstanceDeleted(_SupervisorEvent, frozen=True):
    instance_id: str
    reason: str = ""


class ChatRefused(_SupervisorEvent, frozen=True):
    """A routed chat no Ready instance of its model has room for: it is never run.

    `error_type` is `QueueFull` when every such instance already holds its
    bounded number of chats in flight (the API answers 429), `TooManyChoices` when it asks
    for more answers (`n`) than any of them serves at once (400).
    """

    chat_id: str
    error_type: str
    reason: str


RunnerEvent = RunnerRegistered | RunnerStatusUpdated | TaskStatusUpdated | DownloadProgress | LoadProgress | RunnerLost
SupervisorEvent = InstancePlaced | InstanceFailed | InstanceRetryDue | InstanceDeleted | ChatRefused
Event = RunnerEvent | SupervisorEvent


def event_type(event: Event) -> str:
    """The event's wire `type`."""
    return type(event).__struct_config__.tag  # type: ignore[return-value]
