"""The cluster as the log tells it: plain data, (de)serialisable, hashable by content."""

from __future__ import annotations

import hashlib

import msgspec

from exojet.bus.views import (
    Anomaly,
    DownloadView,
    InstanceView,
    LoadView,
    Retention,
    RoutedChatView,
    RunnerView,
    TaskView,
)

# How many recent event ids a projection remembers to drop duplicates: far more
# than any retry or redelivery produces, and bounded so snapshots stay small.
EVENT_ID_WINDOW = 20_000


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
