"""The projection's views of runners, tasks, instances, downloads, loads, routed chats and
anomalies: what the fold keeps (projections/state.py's ClusterState holds them) and what the
supervisors' query replies carry (bus/replies.py), one declaration for both."""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.bus.capabilities import Capabilities
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.events import Placement
from exojet.bus.statuses import UNREGISTERED, ChatStatus, InstanceStatus, RunnerState, TaskStatus


class RunnerView(msgspec.Struct, kw_only=True):
    runner_id: str
    status: RunnerState = UNREGISTERED
    error_message: str | None = None
    incarnation: int = 0
    host: str = ""
    pid: int = 0
    memory_total: int = 0
    memory_free: int = 0
    address: str = ""
    # The engines it registered with (empty: a runner older than the field, MLX only).
    engines: tuple[str, ...] = ()
    # Its ring key (empty: a runner older than ring keys); the planner puts it in ConnectToGroup.
    ring_key: str = ""
    model_id: str | None = None
    # Its tasks with a Running status and no terminal one yet: one, or several chats.
    running_tasks: list[str] = []
    # Chats it serves at once on its loaded model (its LoadModel's result says; 1 without one).
    chat_capacity: int = 1
    # What it can do with its loaded model beyond a plain chat (its LoadModel's result says; none
    # without one, and from a runner older than the field).
    capabilities: Capabilities = ()
    # The last chats it was given, named by projections.conversations (their cache it may hold).
    conversations: list[str] = []
    # Sequence of this runner's newest message on its own event subject: the
    # expected-last-subject-sequence a supervisor fences RunnerLost with.
    last_event_seq: int = 0
    registered_seq: int = 0
    updated_seq: int = 0


class TaskView(msgspec.Struct, kw_only=True):
    task_id: str
    task_type: str
    runner_id: str
    status: TaskStatus = TaskStatus.PENDING
    instance_id: str | None = None
    model_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None
    created_seq: int = 0
    updated_seq: int = 0


class DownloadView(msgspec.Struct, kw_only=True):
    runner_id: str
    model_id: str
    downloaded_bytes: int = 0
    total_bytes: int = 0
    completed_files: int = 0
    total_files: int = 0
    updated_seq: int = 0


class LoadView(msgspec.Struct, kw_only=True):
    """A runner's newest load of a model: how many of its shard's layers are in memory."""

    runner_id: str
    model_id: str
    task_id: str
    layers_loaded: int = 0
    layers_total: int = 0
    updated_seq: int = 0


class Anomaly(msgspec.Struct, kw_only=True):
    """Something the log says that the contract does not allow; applied, not raised."""

    seq: int
    kind: str
    detail: str
    subject: str = ""
    runner_id: str | None = None
    task_id: str | None = None


class InstanceView(msgspec.Struct, kw_only=True):
    """A model served by one runner or a pipeline group (see projections/instances.py)."""

    instance_id: str
    model_id: str
    # What the PlaceInstance command asked for.
    requested_runners: list[str] | None = None
    min_runners: int = 1
    n_layers: int | None = None
    status: InstanceStatus = "Placing"
    reason: str | None = None
    # The current placement attempt (0 until the first InstancePlaced).
    attempt: int = 0
    placements: list[Placement] = []
    hosts: list[str] = []
    # Set by a final InstanceFailed: no further attempt will be made.
    gave_up: bool = False
    # Attempts in a row that failed before it was Ready: what the retry limit counts (an
    # instance that served and then lost its runner is placed again however often it did).
    failed_unready: int = 0
    # Routed chats on this instance without a terminal status, each counted as its `n` answers
    # (least busy first).
    chats_in_flight: int = 0
    created_seq: int = 0
    placed_seq: int = 0
    updated_seq: int = 0


class RoutedChatView(msgspec.Struct, kw_only=True):
    """A RouteChatCompletion command on its way to a Ready instance."""

    chat_id: str
    model_id: str | None = None
    status: ChatStatus = "Pending"
    instance_id: str | None = None
    # How many ranks' tasks are in the log.
    ranks_published: int = 0
    # The answers it asks for (`n`): the sequences it takes of its instance's capacity.
    choices: int = 1
    # The request until every rank has its task; dropped then to keep snapshots small.
    request: RouteChatCompletion | None = None
    created_seq: int = 0
    updated_seq: int = 0


class Retention(msgspec.Struct, kw_only=True, frozen=True):
    """How long finished work stays in the projection (then it lives only in the log).

    Ages are measured on the log's own clock (each message's server receive time),
    never the wall clock, so a fold stays pure and a replay prunes exactly alike.
    """

    # Finished tasks, finished routed chats, ended instances: at most this many of each.
    finished: int = 10_000
    # ... and none finished longer ago than this (seconds of log time).
    age_s: float = 24 * 3600.0
    # The newest anomalies kept (all are counted).
    anomalies: int = 1_000
