"""Keep a projection of the log: newest snapshot, then replay, then follow live
(bus/nats/log_fold.py, the fold every reader of the log uses), and store snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from exojet.bus.envelope import Envelope
from exojet.bus.nats.log_fold import LogFold
from exojet.bus.nats.snapshot_store import store_snapshot
from exojet.bus.streams import SNAPSHOT_BUCKET
from exojet.bus.views import Retention
from exojet.projections.apply import apply
from exojet.projections.snapshot import dump_snapshot, load_snapshot
from exojet.projections.state import ClusterState

DEFAULT_SNAPSHOT_EVERY = 10_000

Listener = Callable[[ClusterState, Envelope], None]


class Projector:
    """The supervisor's view of the cluster, always a fold of the log up to `state.seq`."""

    def __init__(
        self,
        nc: NATS,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        max_snapshot_bytes: int = 8 * 1024 * 1024,
        retention: Retention | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # A KV value is one message: snapshots are chunked to the server's max_payload.
        self.max_snapshot_bytes = max_snapshot_bytes
        self.retention = retention or Retention()
        self.snapshot_every = snapshot_every
        self.listeners: list[Listener] = []
        self.fold = LogFold(nc, self._apply, lambda: ClusterState(retention=self.retention), self._decode)
        self._kv: KeyValue | None = None
        self._since_snapshot = 0
        self._snapshot_task: asyncio.Task[int] | None = None

    @property
    def state(self) -> ClusterState:
        return self.fold.state

    @property
    def gap(self) -> str | None:
        """Set when the log starts after the snapshot: the projection misses messages."""
        return self.fold.gap

    async def start(self) -> None:
        """Load the newest snapshot, then fold everything after it and keep following."""
        self._kv = await self.js.key_value(SNAPSHOT_BUCKET)
        await self.fold.start()

    def _decode(self, data: bytes) -> ClusterState:
        state = load_snapshot(data)
        # The retention is this supervisor's setting, whatever the snapshot's was;
        # it prunes from the next message on.
        state.retention = self.retention
        return state

    def _apply(self, state: ClusterState, env: Envelope) -> ClusterState:
        state = apply(state, env)
        for listener in self.listeners:
            listener(state, env)
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every and self._snapshot_task is None:
            self._since_snapshot = 0
            self._snapshot_task = asyncio.ensure_future(self.snapshot())
            self._snapshot_task.add_done_callback(lambda _: setattr(self, "_snapshot_task", None))
        return state

    async def snapshot(self) -> int:
        """Store the current state in KV `EXO_SNAPSHOTS`; returns its seq."""
        assert self._kv is not None
        seq = self.state.seq
        data = dump_snapshot(self.state)
        chunks = await store_snapshot(self._kv, data, seq, self.max_snapshot_bytes)
        logger.bind(seq=seq).debug(f"snapshot stored ({len(data)} bytes, {chunks} chunks)")
        return seq

    async def wait_for(self, min_seq: int, timeout: float) -> ClusterState:
        """The state once it has folded `min_seq`, or MinSeqTimeout."""
        return await self.fold.wait_for(min_seq, timeout)

    async def stop(self) -> None:
        """Stop following (the state stays readable)."""
        await self.fold.stop()
        if self._snapshot_task is not None:
            await self._snapshot_task
