"""`/metrics` in Prometheus' text format, from the API's live fold of the log.

Counters and histograms are observed as the log is folded (so an API started late counts
the whole log it replays); gauges (runners by status, projection lag, reconnects) are read
from the fold and the connection when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.lifecycle import ALL_STATUSES
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.bus.tasks import ChatCompletion

if TYPE_CHECKING:
    from exojet.api.live import LiveCluster

# Chats whose first chunk is awaited; older ones are forgotten (their task may never run).
PENDING_FIRST_TOKENS = 10_000
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class ClusterMetrics:
    """One registry per API process (never the global one: tests start several)."""

    def __init__(self, live: LiveCluster) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "exojet_tasks", "Tasks that reached a terminal status", ["type", "status"], registry=self.registry
        )
        self.first_token = Histogram(
            "exojet_first_token_seconds",
            "From a chat's task in the log to its first chunk",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.per_token = Histogram(
            "exojet_token_seconds",
            "A chat's generation time (Running to Complete, log time) per completion token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "exojet_tokens_per_second",
            "Generation speed the runner reported",
            buckets=_RATE_BUCKETS,
            registry=self.registry,
        )
        self.gauges = _Gauges(live)
        self.registry.register(self.gauges)
        # stream id -> the log time its chat was published; task id -> the log time it started running.
        self._published: dict[str, float] = {}
        self._running: dict[str, float] = {}
        # stream id -> when its first chunk arrived, for a chat whose first chunk came before the
        # API's fold read its ChatCompletion (a fast engine answers within the fold's lag); and
        # the stream ids already timed, so their later chunks are not taken for a first one.
        self._first_chunk: dict[str, float] = {}
        self._timed: dict[str, float] = {}

    def on_env(self, env: Envelope, message: Any, old_status: TaskStatus | None) -> None:
        """Observe one folded message (`old_status`: its task's status before it, if a task's)."""
        if isinstance(message, ChatCompletion):
            stream_id = message.stream_id or message.task_id or str(env.seq)
            first = self._first_chunk.pop(stream_id, None)
            if first is not None:
                self._observe_first_token(stream_id, first - env.time)
            elif stream_id not in self._timed:
                self._remember(self._published, stream_id, env.time)
            return
        if not isinstance(message, TaskStatusUpdated):
            return
        status = message.task_status
        if status == TaskStatus.RUNNING:
            self._remember(self._running, message.task_id, env.time)
        elif status in TERMINAL_TASK_STATUSES and old_status not in TERMINAL_TASK_STATUSES:
            self.tasks.labels(message.task_type or "Unknown", str(status)).inc()
            started = self._running.pop(message.task_id, None)
            result = message.result or {}
            tokens = result.get("completion_tokens")
            if status == TaskStatus.COMPLETE and isinstance(tokens, int) and tokens > 0:
                if started is not None:
                    self.per_token.observe(max(env.time - started, 0.0) / tokens)
                rate = result.get("tokens_per_second")
                if isinstance(rate, int | float) and rate > 0:
                    self.tokens_per_second.observe(rate)

    def on_chunk(self, stream_id: str, now: float) -> None:
        """A chunk arrived on `exo.chunks.<stream_id>`: the first one of a chat times its first token."""
        published = self._published.pop(stream_id, None)
        if published is not None:
            self._observe_first_token(stream_id, now - published)
        elif stream_id not in self._timed and stream_id not in self._first_chunk:
            self._remember(self._first_chunk, stream_id, now)

    def _observe_first_token(self, stream_id: str, seconds: float) -> None:
        self.first_token.observe(max(seconds, 0.0))
        self._remember(self._timed, stream_id, 0.0)

    @staticmethod
    def _remember(table: dict[str, float], key: str, at: float) -> None:
        if len(table) >= PENDING_FIRST_TOKENS:
            del table[next(iter(table))]
        table[key] = at


class _Gauges(Collector):
    """Read at scrape time: runners by status, how far the fold is behind the log, reconnects."""

    def __init__(self, live: LiveCluster) -> None:
        self.live = live
        self.log_last_seq = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runners = GaugeMetricFamily(
            "exojet_runners", "Runners by status (the API's fold of the log)", labels=["status"]
        )
        counts = dict.fromkeys(("Unregistered", *ALL_STATUSES), 0)
        for r in self.live.state.runners.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        for status, n in counts.items():
            runners.add_metric([status], n)
        yield runners
        yield GaugeMetricFamily(
            "exojet_projection_seq", "The newest log sequence the API's fold has applied", value=self.live.state.seq
        )
        yield GaugeMetricFamily(
            "exojet_projection_lag",
            "Log messages written but not yet folded by the API (as of the last scrape)",
            value=max(self.log_last_seq - self.live.state.seq, 0),
        )
        nc = self.live.nc
        yield GaugeMetricFamily(
            "exojet_nats_reconnects",
            "Reconnects of the API's log connection",
            value=nc.stats["reconnects"] if nc else 0,
        )
