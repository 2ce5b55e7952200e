"""Keep a projection of the log: newest snapshot, then replay, then follow live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.nats.follower import Follower
from exojet.bus.streams import LOG_STREAM, SNAPSHOT_BUCKET
from exojet.projections.apply import apply
from exojet.projections.snapshot import SnapshotError, dump_snapshot, load_snapshot
from exojet.projections.state import ClusterState, Retention
from exojet.supervisor.snapshot_store import load_snapshot_bytes, store_snapshot

DEFAULT_SNAPSHOT_EVERY = 10_000
# A start waits this long at most for the fold to reach the log's end.
CATCH_UP_TIMEOUT_S = 600.0

Listener = Callable[[ClusterState, Envelope], None]


class MinSeqTimeout(Exception):
    """The projection did not reach the sequence a query asked for in time."""


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
        # Set when the log starts after the snapshot: the projection misses messages.
        self.gap: str | None = None
        self.retention = retention or Retention()
        self.state = ClusterState(retention=self.retention)
        self.snapshot_every = snapshot_every
        self.listeners: list[Listener] = []
        self._kv: KeyValue | None = None
        self._since_snapshot = 0
        # (min_seq, future) of queries waiting for the projection to get there.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._follower: Follower | None = None
        self._snapshot_task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        """Load the newest snapshot, then fold everything after it and keep following."""
        started = time.perf_counter()
        self._kv = await self.js.key_value(SNAPSHOT_BUCKET)
        await self._load_snapshot()
        # The retention is this supervisor's setting, whatever the snapshot's was;
        # it prunes from the next message on.
        self.state.retention = self.retention
        from_snapshot = self.state.seq
        await self._check_horizon()
        # One read catches up and then follows live (through outages): no seam between the two.
        end = await client.last_seq(self.js)
        if self._follower is not None:  # a start tried again after NATS went away mid-way
            await self._follower.stop()
        self._follower = await client.follow(self.nc, self._on_envelope, start_seq=self.state.seq + 1)
        await self.wait_for(end, CATCH_UP_TIMEOUT_S)
        logger.bind(seq=self.state.seq, snapshot_seq=from_snapshot).info(
            f"projection caught up in {time.perf_counter() - started:.3f} s"
        )

    async def _check_horizon(self) -> None:
        """Say so, and what to do, when the log's first message comes after the snapshot's next."""
        info = await self.js.stream_info(LOG_STREAM)
        first = info.state.first_seq
        if info.state.messages == 0 or first <= self.state.seq + 1:
            return
        self.gap = (
            f"the log starts at seq {first} but this supervisor's snapshot is at seq {self.state.seq}: "
            f"messages {self.state.seq + 1}-{first - 1} were removed by EXO_LOG's limits and the projection "
            "misses what they said (it folds on from the log's first message). To rebuild it exactly, "
            "replay an archive that holds them (`exojet replay --file ARCHIVE --state`); to avoid it, "
            "snapshot more often (--snapshot-every) or raise the limits (--log-max-age, --log-max-bytes)"
        )
        logger.bind(seq=self.state.seq, first_seq=first).error(self.gap)

    async def _load_snapshot(self) -> None:
        assert self._kv is not None
        try:
            data = await load_snapshot_bytes(self._kv)
            if data is not None:
                self.state = load_snapshot(data)
        except SnapshotError as err:
            # A snapshot is only a shortcut: without it we fold the whole log.
            logger.warning(f"ignoring unreadable snapshot: {err}")
            self.state = ClusterState()

    def _on_envelope(self, env: Envelope) -> None:
        if env.seq <= self.state.seq:
            return
        self.state = apply(self.state, env)
        for listener in self.listeners:
            listener(self.state, env)
        if self._waiters:
            self._wake(self.state.seq)
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every and self._snapshot_task is None:
            self._since_snapshot = 0
            self._snapshot_task = asyncio.ensure_future(self.snapshot())
            self._snapshot_task.add_done_callback(lambda _: setattr(self, "_snapshot_task", None))

    def _wake(self, seq: int) -> None:
        waiting = []
        for min_seq, future in self._waiters:
            if seq >= min_seq:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((min_seq, future))
        self._waiters = waiting

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
        if self.state.seq >= min_seq:
            return self.state
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((min_seq, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._waiters = [(m, f) for m, f in self._waiters if f is not future]
            raise MinSeqTimeout(
                f"projection is at seq {self.state.seq}, min_seq {min_seq} not reached within {timeout} s"
            ) from None
        return self.state

    async def stop(self) -> None:
        """Stop following (the state stays readable)."""
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None
        if self._snapshot_task is not None:
            await self._snapshot_task
