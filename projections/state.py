"""The cluster as the log tells it: plain data, (de)serialisable, hashable by content."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.events import Placement
from exojet.bus.statuses import TaskStatus
from exojet.projections.rules import UNREGISTERED, RunnerState

InstanceStatus = Literal["Placing", "Downloading", "Connecting", "Loading", "WarmingUp", "Ready", "Failed", "Deleted"]
# Pending (no rank published yet), Routed, Refused (ChatRefused), Cancelled (CancelChat while
# pending), or the emitting rank's terminal task status.
ChatStatus = Literal["Pending", "Routed", "Refused", "Cancelled", "Complete", "Failed", "TimedOut"]

# How many recent event ids a projection remembers to drop duplicates: far more
# than any retry or redelivery produces, and bounded so snapshots stay small.
EVENT_ID_WINDOW = 20_000


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


class ClusterState(msgspec.Struct, kw_only=True):
    seq: int = 0
    retention: Retention = Retention()
    runners: dict[str, RunnerView] = {}
    tasks: dict[str, TaskView] = {}
    # Tasks without a terminal status (a dict keeps the order they were published in):
    # what `state` counts and weighs runners by, without scanning every task.
    unfinished: dict[str, None] = {}
    downloads: dict[str, DownloadView] = {}
    # Keyed like downloads (`download_key`); a reload of the model replaces its entry.
    loads: dict[str, LoadView] = {}
    anomalies: list[Anomaly] = []
    # Every anomaly ever folded; `anomalies` holds the newest `retention.anomalies`.
    anomaly_count: int = 0
    instances: dict[str, InstanceView] = {}
    # runner id -> the newest instance placed on it (kept after that instance ends).
    runner_instances: dict[str, str] = {}
    chats: dict[str, RoutedChatView] = {}
    # Chats with a rank still to publish, oldest first (a dict keeps the order).
    pending_chats: dict[str, None] = {}
    # ChatCompletion task id -> routed chat id, while the chat is not terminal.
    chat_tasks: dict[str, str] = {}
    # Runners drained for maintenance (DrainRunner, until UndrainRunner): id -> the command's seq.
    drained: dict[str, int] = {}
    # Sequence of the newest message on `exo.events.supervisor`: the fence of InstancePlaced.
    supervisor_seq: int = 0
    # Insertion-ordered (a dict keeps the order); trimmed back to EVENT_ID_WINDOW
    # whenever it grows half as large again, so what it holds depends only on
    # the sequence of events, never on where a snapshot was cut.
    recent_event_ids: dict[str, None] = {}
    # Finished work in the order it finished, with the log time it did:
    # [id, time], oldest first (see projections/retention.py).
    finished_tasks: list[tuple[str, float]] = []
    finished_chats: list[tuple[str, float]] = []
    finished_instances: list[tuple[str, float]] = []
    # How many of each were pruned, and the newest sequence a pruned one was
    # touched at: a query for an id not here names this horizon.
    pruned: int = 0
    pruned_seq: int = 0
    # The newest sequence the fold jumped to (0: it has seen every message from 1).
    # Before it lie messages it never saw (a log trimmed by its limits, an archive
    # of a range): statuses of tasks and runners it never met are taken as they come.
    horizon: int = 0


_hash_encoder = msgspec.json.Encoder(order="sorted")


def state_hash(state: ClusterState) -> str:
    """A digest equal for equal states, whatever order their dicts were filled in."""
    return hashlib.sha256(_hash_encoder.encode(state)).hexdigest()


def download_key(runner_id: str, model_id: str) -> str:
    return f"{runner_id}/{model_id}"
