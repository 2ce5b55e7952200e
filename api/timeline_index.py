"""`/timeline/{seq}`: the cluster as the page's fold had it right after any message, from
in-memory checkpoints of that fold and a bounded replay.

The page's fold (`api/live.py`) starts from the newest snapshot; what came before it is
folded once in the background (`history`), from the log's first message. Both keep a
checkpoint every `CHECKPOINT_EVERY` messages (`projections/checkpoints.py`: segments
shared between checkpoints) and the messages folded after it, compressed in one block
(reading them back from NATS costs more than folding them). A state at `seq` is the newest
checkpoint at or before it, restored, with at most `CHECKPOINT_EVERY` messages folded on:
its cost does not grow with the log. A million messages take tens of MB.
"""

from __future__ import annotations

import asyncio
import gc
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.replies import StateReply
from exojet.bus.views import Retention
from exojet.projections.apply import apply
from exojet.projections.checkpoints import Checkpoint, Checkpoints, restore
from exojet.projections.queries import Paging, state_reply
from exojet.projections.state import ClusterState
from exojet.projections.words import envelope_json

CHECKPOINT_EVERY = 1000
# The most the checkpoints and their messages may hold; the oldest go first (a million
# messages of a busy cluster take about 44 MiB: bench/timeline.py).
MAX_BYTES = 100 * 2**20
# Timeline requests rebuilding a state at once; more are answered 429 (each costs tens of ms of CPU).
MAX_AT_ONCE = 2
# What a state shows: the first page of each collection, as the live page does.
PAGE = Paging(offset=0, limit=200)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Envelope])


class TimelineBusy(Exception):
    """As many timeline requests as allowed are being answered already."""


class NotIndexedYet(Exception):
    """The history before the page's snapshot is still being folded past this seq."""


class NotKept(Exception):
    """The timeline no longer keeps what it needs for this seq (it keeps at most `MAX_BYTES`)."""


class Part:
    """Checkpoints of one fold and, after each, the messages it folded until the next."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.checkpoints = Checkpoints()
        # Per checkpoint but the newest: its messages, compressed, and their bytes.
        self.blocks: list[bytes] = []
        self.block_bytes = 0
        # The messages since the newest checkpoint.
        self.pending: list[Envelope] = []

    @property
    def held(self) -> int:
        """Bytes held: the checkpoints (each shared segment once) and the blocks."""
        return self.checkpoints.held + self.block_bytes

    def add(self, state: ClusterState, env: Envelope | None = None) -> bool:
        """`state` is the fold's after `env` (None: the state it starts from); True if checkpointed."""
        if env is not None:
            self.pending.append(env)
        checkpoints = self.checkpoints.checkpoints
        if checkpoints and state.seq - checkpoints[-1].seq < self.every:
            return False
        if checkpoints:
            self.blocks.append(zlib.compress(_encoder.encode(self.pending), 1))
            self.block_bytes += len(self.blocks[-1])
            self.pending = []
        self.checkpoints.add(state)
        return True

    def drop_oldest(self) -> None:
        self.checkpoints.drop_oldest()
        self.block_bytes -= len(self.blocks.pop(0))

    def at(self, seq: int) -> tuple[Checkpoint, list[Envelope]] | None:
        """The newest checkpoint before `seq`, and the messages after it up to `seq` (None: the
        fold started after `seq`)."""
        checkpoints = self.checkpoints.checkpoints
        index = self.checkpoints.before(seq - 1)
        if index is None:
            return None
        block = self.blocks[index] if index < len(self.blocks) else None
        after = _decoder.decode(zlib.decompress(block)) if block is not None else self.pending
        return checkpoints[index], [env for env in after if env.seq <= seq]


class TimelineIndex:
    """Checkpoints of the page's fold (`live`, from its snapshot on) and of the history before it."""

    def __init__(self, every: int = CHECKPOINT_EVERY, at_once: int = MAX_AT_ONCE, max_bytes: int = MAX_BYTES) -> None:
        self.every = every
        self.at_once = at_once
        self.max_bytes = max_bytes
        # Every seq at or before it was dropped to stay within `max_bytes`.
        self.dropped_seq = 0
        self.history = Part(every)
        self.live = Part(every)
        # The page's fold starts at this seq (its snapshot's; 0: the log's start), and the
        # history before it is folded up to `history_seq`.
        self.live_from = 0
        self.history_seq = 0
        self.busy = 0

    def started(self, state: ClusterState) -> None:
        """The page's fold starts from `state` (a snapshot's, or empty)."""
        self.live_from = state.seq
        self.live = Part(self.every)
        self.live.add(state)

    def folded(self, state: ClusterState, env: Envelope) -> None:
        """The page's fold applied `env`."""
        if self.live.add(state, env):
            self._bound()

    def _bound(self) -> None:
        """Drop the oldest checkpoints (of the history first) while more than `max_bytes` are held."""
        while self.history.held + self.live.held > self.max_bytes:
            part = self.history if len(self.history.blocks) > 0 else self.live
            if not part.blocks:
                return
            part.drop_oldest()
            self.dropped_seq = part.checkpoints.checkpoints[0].seq

    async def fold_history(
        self, nc: NATS, retention: Retention, observe: Callable[[ClusterState, Envelope], ClusterState]
    ) -> None:
        """Fold the log before the page's snapshot (`observe` folds each message, for what the page
        shows of them besides the state), checkpointing as the page's fold does."""
        state = ClusterState(retention=retention)
        self.history.add(state)

        def on_env(env: Envelope) -> None:
            nonlocal state
            state = observe(state, env)
            if self.history.add(state, env):
                self._bound()
            self.history_seq = env.seq

        if self.live_from > 0:
            await client.replay(nc, on_env, end_seq=self.live_from)
        self.history_seq = self.live_from

    def _part(self, seq: int) -> Part:
        if seq > self.live_from:
            return self.live
        if seq <= self.history_seq:
            return self.history
        raise NotIndexedYet(
            f"the timeline is still reading the log before the page's snapshot (at seq {self.history_seq} "
            f"of {self.live_from}); try again shortly"
        )

    async def state_at(self, seq: int) -> tuple[Any, StateReply | None]:
        """The message at `seq` (as JSON, None if the page's fold has none) and the cluster right after it."""
        if self.busy >= self.at_once:
            raise TimelineBusy(f"{self.busy} timeline requests are being answered; try again shortly")
        self.busy += 1
        try:
            if seq <= self.dropped_seq:
                raise NotKept(
                    f"the timeline keeps at most {self.max_bytes // 2**20} MiB, from seq {self.dropped_seq + 1} on: "
                    f"`exojet replay --to {seq} --state` rebuilds the state at seq {seq} from the log"
                )
            found = self._part(seq).at(seq)
            if found is None:
                return None, None
            checkpoint, envelopes = found
            last = envelopes[-1] if envelopes else None
            if last is None or last.seq != seq:
                return None, None
            return envelope_json(last), await asyncio.to_thread(_rebuilt, checkpoint, envelopes)
        finally:
            self.busy -= 1


def _rebuilt(checkpoint: Checkpoint, envelopes: list[Envelope]) -> StateReply:
    """The state of `checkpoint` with `envelopes` folded on, as the page shows it."""
    # Tens of thousands of objects made at once: a collection in the middle would scan the
    # whole heap several times over (hundreds of ms). They are freed after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        state = restore(checkpoint)
        for env in envelopes:
            if env.seq > state.seq:
                state = apply(state, env)
        return state_reply(state, PAGE)
    finally:
        if collecting:
            gc.enable()
