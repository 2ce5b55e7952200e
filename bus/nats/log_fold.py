"""A fold of `EXO_LOG` kept live: the newest snapshot, then every message after it, in order, once.

Every reader of the whole log folds it this way (the supervisor's projector, the API's
page): the state a stored snapshot holds, then one read from the message after it that
catches up and goes on following live, through outages, with no seam between the two.
What the state is and how a message changes it is the caller's (`apply`, `empty`,
`decode` of a snapshot's bytes): bus/ knows no projection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from loguru import logger
from nats.aio.client import Client as NATS

from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.nats.connection import TRANSIENT_ERRORS
from exojet.bus.nats.follower import Follower
from exojet.bus.nats.snapshot_store import SnapshotUnreadable, load_snapshot_bytes
from exojet.bus.streams import LOG_STREAM, SNAPSHOT_BUCKET

# A start waits this long at most for the fold to reach the log's end.
CATCH_UP_TIMEOUT_S = 600.0


class Folded(Protocol):
    # The sequence of the newest message folded in (0: none).
    seq: int


S = TypeVar("S", bound=Folded)


class MinSeqTimeout(Exception):
    """The fold did not reach the sequence a reader asked for in time."""


class LogFold(Generic[S]):
    """`state` is always `apply` folded over the log (from a snapshot's state) up to `state.seq`.

    `decode` turns a stored snapshot's bytes into a state, raising ValueError for bytes it
    cannot read (the fold then starts from `empty()`, the whole log)."""

    def __init__(
        self,
        nc: NATS,
        apply: Callable[[S, Envelope], S],
        empty: Callable[[], S],
        decode: Callable[[bytes], S],
        name: str = "projection",
        started: Callable[[S], None] | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.apply = apply
        self.empty = empty
        self.decode = decode
        self.name = name
        # Told the state the fold starts from (a snapshot's, or empty), before it applies a message.
        self.started = started
        self.state = empty()
        # The seq of the snapshot the fold started from (0: none).
        self.snapshot_seq = 0
        # Set when the log starts after the snapshot: the fold misses messages.
        self.gap: str | None = None
        # (min_seq, future) of readers waiting for the fold to get there.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._follower: Follower | None = None

    async def start(self, timeout: float = CATCH_UP_TIMEOUT_S) -> None:
        """Load the newest snapshot, then fold everything after it and keep following;
        returns once the fold reached the log's end as it was when it started."""
        started = time.perf_counter()
        self.state = await self._from_snapshot()
        self.snapshot_seq = self.state.seq
        if self.started is not None:
            self.started(self.state)
        await self._check_horizon()
        end = await client.last_seq(self.js)
        if self._follower is not None:  # a start tried again after NATS went away mid-way
            await self._follower.stop()
        self._follower = await client.follow(self.nc, self._on_envelope, start_seq=self.state.seq + 1)
        await self.wait_for(end, timeout)
        logger.bind(seq=self.state.seq, snapshot_seq=self.snapshot_seq).info(
            f"{self.name} caught up in {time.perf_counter() - started:.3f} s"
        )

    async def _from_snapshot(self) -> S:
        """The newest snapshot's state; without one (none stored, unreadable, not ours to read), empty."""
        try:
            kv = await self.js.key_value(SNAPSHOT_BUCKET)
            data = await load_snapshot_bytes(kv)
            if data is not None:
                return self.decode(data)
        except (SnapshotUnreadable, ValueError) as err:
            # A snapshot is only a shortcut: without it we fold the whole log.
            logger.warning(f"{self.name}: ignoring unreadable snapshot: {err}")
        except TRANSIENT_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 - no bucket, or no permission to read it: the whole log
            logger.info(f"{self.name}: no snapshot to start from ({err!r}); folding the whole log")
        return self.empty()

    async def _check_horizon(self) -> None:
        """Say so, and what to do, when the log's first message comes after the snapshot's next."""
        info = await self.js.stream_info(LOG_STREAM)
        first = info.state.first_seq
        if info.state.messages == 0 or first <= self.state.seq + 1:
            return
        self.gap = (
            f"the log starts at seq {first} but the {self.name}'s snapshot is at seq {self.state.seq}: "
            f"messages {self.state.seq + 1}-{first - 1} were removed by EXO_LOG's limits and the projection "
            "misses what they said (it folds on from the log's first message). To rebuild it exactly, "
            "replay an archive that holds them (`exojet replay --file ARCHIVE --state`); to avoid it, "
            "snapshot more often (--snapshot-every) or raise the limits (--log-max-age, --log-max-bytes)"
        )
        logger.bind(seq=self.state.seq, first_seq=first).error(self.gap)

    def _on_envelope(self, env: Envelope) -> None:
        if env.seq <= self.state.seq:
            return
        self.state = self.apply(self.state, env)
        if self._waiters:
            self._wake(self.state.seq)

    def _wake(self, seq: int) -> None:
        waiting = []
        for min_seq, future in self._waiters:
            if seq >= min_seq:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((min_seq, future))
        self._waiters = waiting

    async def wait_for(self, min_seq: int, timeout: float) -> S:
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
                f"{self.name} is at seq {self.state.seq}, min_seq {min_seq} not reached within {timeout} s"
            ) from None
        return self.state

    async def stop(self) -> None:
        """Stop following (the state stays readable)."""
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None
