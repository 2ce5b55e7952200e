"""The API's own view of the cluster: `EXO_LOG` folded as every reader folds it (the newest
snapshot, then one read that catches up and follows live: bus/nats/log_fold.py).

It feeds the live page (its first view, and the server-sent events that keep it live), the
timeline and `/metrics`. It starts with the API (`begin`), so `/metrics` times the first token
of every chat the API serves, not only of those after the first scrape. The log before the
snapshot is folded once in the background, for the timeline's checkpoints, the counters of
`/metrics` and the newest marks (`api/timeline_index.py`). Heartbeats (core NATS, not in the
log) only stamp each runner's last-seen time; chunks (`EXO_CHUNKS`, new ones only) give
first-token latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from exojet.api.load_chart import BUCKET_S, LoadView
from exojet.api.metrics import ClusterMetrics
from exojet.api.timeline_index import TimelineIndex
from exojet.bus import subjects
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.nats.log_fold import LogFold
from exojet.bus.replies import StateReply
from exojet.bus.streams import CHUNKS_STREAM
from exojet.projections.apply import apply
from exojet.projections.placing import placing_waits
from exojet.projections.queries import Paging, state_reply
from exojet.projections.snapshot import load_snapshot
from exojet.projections.state import ClusterState
from exojet.projections.timeline import Mark, fold
from exojet.projections.words import message_of, task_id_of

# Timeline marks kept for the page (older ones: `exojet replay`).
RECENT_EVENTS = 2000
# The load view's updates to the browsers: its chart moves on even when the log is quiet.
LOAD_EVERY_S = 2.0
# A browser that reads slower than this many updates behind is dropped (it reconnects and
# starts from a fresh first view), so one stalled tab never holds the API's memory.
SUBSCRIBER_BACKLOG = 1000


class LiveCluster:
    """The fold of the log, kept live, with the recent marks and the browsers that follow them."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.fold: LogFold[ClusterState] | None = None
        self.timeline = TimelineIndex()
        self.recent: deque[Mark] = deque(maxlen=RECENT_EVENTS)
        self.heartbeats: dict[str, float] = {}
        self.metrics = ClusterMetrics(self)
        self.load = LoadView()
        self.nc: NATS | None = None
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._started: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self._folded = asyncio.Event()
        self._history: asyncio.Task[None] | None = None
        self._load_updates: asyncio.Task[None] | None = None

    @property
    def state(self) -> ClusterState:
        return self.fold.state if self.fold is not None else ClusterState()

    def begin(self) -> None:
        """Start following the log, once, without waiting for it to catch up."""
        if self._started is None:
            self._started = asyncio.create_task(self._start())

    async def ready(self) -> None:
        """Start following the log once (the first caller starts it, every caller waits for the catch-up)."""
        self.begin()
        assert self._started is not None
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self.nc = await client.connect(self.nats_url, name="exojet-api-live", wait=True)
        js = self.nc.jetstream()
        self.fold = LogFold(
            self.nc, self._on_env, ClusterState, load_snapshot, name="the page's fold", started=self.timeline.started
        )
        await self.fold.start()
        self._history = asyncio.create_task(self._fold_history())
        self._load_updates = asyncio.create_task(self._publish_load())
        self._subs.append(await self.nc.subscribe(subjects.HEARTBEATS, cb=self._on_heartbeat))
        self._subs.append(
            await js.subscribe(
                f"{subjects.CHUNKS_PREFIX}.>",
                stream=CHUNKS_STREAM,
                cb=self._on_chunk,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.NEW,
            )
        )

    async def close(self) -> None:
        # A start still waiting for its server (or replaying) is cancelled, not left behind.
        for task in (self._started, self._history, self._load_updates):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.fold is not None:
            await self.fold.stop()
        if self.nc is not None:
            await self.nc.close()

    def _on_env(self, state: ClusterState, env: Envelope) -> ClusterState:
        state, folded = fold(state, env)
        self.metrics.on_env(state, env, folded.message, folded.old_task_status)
        self.load.observe(state, env, folded.message)
        self.recent.append(folded.mark)
        self.timeline.folded(state, env)
        self._folded.set()
        if self._subscribers:
            self._publish({"mark": folded.mark, **self._changed(state, env, folded.message)})
        return state

    async def _fold_history(self) -> None:
        """Fold the log before the snapshot the page started from: the timeline's checkpoints,
        the counters of `/metrics`, and the newest marks (before those of the page's fold)."""
        assert self.nc is not None
        marks: deque[Mark] = deque(maxlen=RECENT_EVENTS)
        marks_from = self.timeline.live_from - RECENT_EVENTS

        def observe(state: ClusterState, env: Envelope) -> ClusterState:
            if env.seq > marks_from:
                state, folded = fold(state, env)
                marks.append(folded.mark)
                self.metrics.on_env(state, env, folded.message, folded.old_task_status)
                return state
            message = message_of(env)
            task = state.tasks.get(task_id_of(env, message) or "")
            state = apply(state, env)
            self.metrics.on_env(state, env, message, task.status if task is not None else None)
            return state

        await self.timeline.fold_history(self.nc, self.state.retention, observe)
        self.recent = deque([*marks, *self.recent], maxlen=RECENT_EVENTS)

    async def caught_up(self, seq: int, timeout: float) -> bool:
        """Whether the fold reaches `seq` within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while self.state.seq < seq:
                    self._folded.clear()
                    await self._folded.wait()
        except TimeoutError:
            return False
        return True

    def _changed(self, state: ClusterState, env: Envelope, message: object) -> dict[str, Any]:
        """The views that `env` changed, for the browsers to redraw."""
        runner_id = subjects.runner_of(env.subject)
        task = state.tasks.get(task_id_of(env, message) or "")
        return {
            "runner": state.runners.get(runner_id or ""),
            "task": task,
            "task_time": self.load.task_time(task),
            "instances": [i for i in state.instances.values() if i.updated_seq == env.seq],
            # Any change may free (or take) a runner a Placing instance waits for.
            "waiting": placing_waits(state),
            "downloads": [d for d in state.downloads.values() if d.updated_seq == env.seq],
            "loads": [d for d in state.loads.values() if d.updated_seq == env.seq],
        }

    async def _on_heartbeat(self, msg: Any) -> None:
        runner_id = subjects.runner_of(msg.subject)
        if runner_id is None:
            return
        now = time.time()
        # One update a second per runner is enough for "seconds since".
        if now - self.heartbeats.get(runner_id, 0.0) >= 1.0:
            self.heartbeats[runner_id] = now
            self._publish({"heartbeat": {"runner_id": runner_id, "at": now}})

    async def _on_chunk(self, msg: Any) -> None:
        self.metrics.on_chunk(subjects.chunks_stream_id(msg.subject), time.time())

    async def _publish_load(self) -> None:
        while True:
            await asyncio.sleep(LOAD_EVERY_S)
            if self._subscribers:
                self._publish(self.load_update())

    def load_update(self) -> dict[str, Any]:
        """Every runner's load now, as the page's load view draws it."""
        return {"load": self.load.loads(self.state, time.time()), "bucket_s": BUCKET_S}

    def _publish(self, update: dict[str, Any]) -> None:
        data = b"data: " + msgspec.json.encode(update) + b"\n\n"
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
                logger.warning("a page fell too far behind its live updates; dropped it")

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._subscribers.discard(queue)

    def snapshot(self) -> dict[str, Any]:
        """What the first view shows: the projection's page, heartbeats, recent marks."""
        reply = state_reply(self.state, Paging(offset=0, limit=200))
        task_times = {task_id: self.load.task_time(task) for task_id, task in reply.tasks.items()}
        snapshot: dict[str, Any] = msgspec.to_builtins(
            {
                **msgspec.to_builtins(reply),
                "heartbeats": self.heartbeats,
                "marks": list(self.recent),
                "task_times": task_times,
                **self.load_update(),
            }
        )
        return snapshot

    async def state_at(self, seq: int) -> tuple[Any, StateReply | None]:
        """The message at `seq` (as JSON) and the cluster as the fold had it right after
        (`TimelineBusy`, `NotIndexedYet`)."""
        return await self.timeline.state_at(seq)
