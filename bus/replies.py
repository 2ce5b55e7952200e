"""The supervisors' query replies (`exo.supervisor.*`), built by the projection's answers
(projections/queries.py) and decoded once by the query client (bus/nats/query_client.py).

A reply carries the projection's own views (bus/views.py) and is encoded straight to JSON. No
reply grows with history: `state` answers counts and one page of each collection, `runner`,
`task` and `instance` one object. A `Page` sits next to the collection it cuts, which keeps its
shape (`runners`, `instances`, `tasks` keyed by id); a client asks again with `offset` for more.
Fields a reply may lack (an older supervisor's) have defaults.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

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


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """Where a listed collection's page lies in the whole (`next_offset` None: the last page)."""

    total: int = 0
    offset: int = 0
    limit: int = 0
    next_offset: int | None = None


class ConnectionSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A part's connection to NATS, as the part itself tells it."""

    connected: bool = True
    outages: int = 0
    last_outage_s: float = 0.0
    down_for_s: float = 0.0


class RunnerConnection(msgspec.Struct, frozen=True, kw_only=True):
    """A runner's outages, as its heartbeats tell them (None: not told)."""

    outages: int | None = None
    last_outage_s: float | None = None


class Connections(msgspec.Struct, frozen=True, kw_only=True):
    """Not in the log (a disconnected part could not have written it): from the parts themselves."""

    supervisors: dict[str, ConnectionSummary] = {}
    runners: dict[str, RunnerConnection] = {}


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """What every reply carries: the sequence the projection had folded, and what the service
    adds (the answering supervisor, a gap in its fold), absent from the pure answers."""

    seq: int
    supervisor_id: str | UnsetType = UNSET
    warning: str | UnsetType = UNSET


class StateReply(Reply, frozen=True, kw_only=True):
    runners: dict[str, RunnerView] = {}
    runners_page: Page = Page()
    # Each listed runner's unfinished tasks.
    load: dict[str, int] = {}
    instances: dict[str, InstanceView] = {}
    instances_page: Page = Page()
    # Why each listed instance still Placing is not placed yet (the planner's rule, not in the log).
    waiting: dict[str, str] = {}
    tasks: dict[str, TaskView] = {}
    tasks_page: Page = Page()
    downloads: dict[str, DownloadView] = {}
    loads: dict[str, LoadView] = {}
    # Chats still waiting for a rank to be published (the rest are tasks), without their request.
    pending_chats: list[RoutedChatView] = []
    pending_chat_count: int = 0
    anomaly_count: int = 0
    # The newest few (the count is of all of them).
    anomalies: list[Anomaly] = []
    drained: list[str] = []
    unfinished_tasks: int = 0
    retention: Retention = Retention()
    pruned: int = 0
    pruned_seq: int = 0
    # The whole state's digest, when asked for (`hash`: a full encode, slow on a large state).
    state_hash: str | UnsetType = UNSET
    # Added by the service.
    connections: Connections | UnsetType = UNSET


class RunnerReply(Reply, frozen=True, kw_only=True):
    runner: RunnerView
    drained: bool = False
    # A page of its tasks, newest first.
    tasks: list[TaskView] = []
    tasks_page: Page = Page()
    # Live instances placed on it or asked to be.
    instances: dict[str, InstanceView] = {}


class TaskReply(Reply, frozen=True, kw_only=True):
    task: TaskView


class InstanceReply(Reply, frozen=True, kw_only=True):
    instance: InstanceView
    waiting: str | None = None


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a query was refused: `type` is its code (NotFound, BadRequest, Timeout)."""

    type: str
    message: str


class RefusalReply(Reply, frozen=True, kw_only=True):
    error: Refusal


AnyReply = StateReply | RunnerReply | TaskReply | InstanceReply
