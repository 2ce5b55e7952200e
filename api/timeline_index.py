"""`/timeline/{seq}`: the cluster as the page's fold had it right after any message, from
in-memory checkpoints of that fold and a bounded replay.

The page's fold (`api/live.py`) starts from the newest snapshot; what came before it is
folded once in the background (`history`), from the log's first message. Both keep a
checkpoint every `CHECKPOINT_EVERY` messages (`projections/checkpoints.py`: segments
shared between checkpoints, so a million messages fit in tens of MB). A state at `seq`
is the newest checkpoint at or before it, restored, with at most `CHECKPOINT_EVERY`
messages read from the log and folded on: its cost does not grow with the log.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.projections.apply import apply
from exojet.projections.checkpoints import Checkpoint, Checkpoints, restore
from exojet.projections.queries import Paging, state_reply
from exojet.projections.state import ClusterState, Retention
from exojet.projections.words import envelope_json

CHECKPOINT_EVERY = 1000
# Timeline requests rebuilding a state at once; more are answered 429 (each costs tens of ms of CPU).
MAX_AT_ONCE = 2
# What a state shows: the first page of each collection, as the live page does.
PAGE = Paging(offset=0, limit=200)


class TimelineBusy(Exception):
    """As many timeline requests as allowed are being answered already."""


class NotIndexedYet(Exception):
    """The history before the page's snapshot is still being folded past this seq."""


class TimelineIndex:
    """Checkpoints of the page's fold (`live`, from its snapshot on) and of the history before it."""

    def __init__(self, every: int = CHECKPOINT_EVERY, at_once: int = MAX_AT_ONCE) -> None:
        self.every = every
        self.at_once = at_once
        self.history = Checkpoints()
        self.live = Checkpoints()
        # The page's fold starts at this seq (its snapshot's; 0: the log's start), and the
        # history before it is folded up to `history_seq`.
        self.live_from = 0
        self.history_seq = 0
        self.busy = 0

    def started(self, state: ClusterState) -> None:
        """The page's fold starts from `state` (a snapshot's, or empty)."""
        self.live_from = state.seq
        self.live = Checkpoints()
        self.live.add(state)

    def folded(self, state: ClusterState) -> None:
        """The page's fold applied a message: a checkpoint when one is due."""
        if state.seq - self.live.checkpoints[-1].seq >= self.every:
            self.live.add(state)

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
            self.history_seq = env.seq
            if env.seq - self.history.checkpoints[-1].seq >= self.every:
                self.history.add(state)

        if self.live_from > 0:
            await client.replay(nc, on_env, end_seq=self.live_from)
        self.history_seq = self.live_from

    def _checkpoint(self, seq: int) -> Checkpoint:
        if seq >= self.live_from:
            found = self.live.before(seq)
        elif seq <= self.history_seq:
            found = self.history.before(seq)
        else:
            raise NotIndexedYet(
                f"the timeline is still reading the log before the page's snapshot (at seq {self.history_seq} "
                f"of {self.live_from}); try again shortly"
            )
        assert found is not None  # each part starts with a checkpoint at its first seq
        return found

    async def state_at(self, nc: NATS, seq: int) -> tuple[Any, dict[str, Any]]:
        """The message at `seq` (as JSON, None if there is none) and the cluster right after it."""
        if self.busy >= self.at_once:
            raise TimelineBusy(f"{self.busy} timeline requests are being answered; try again shortly")
        self.busy += 1
        try:
            checkpoint = self._checkpoint(seq)
            envelopes: list[Envelope] = []
            await client.replay(nc, envelopes.append, start_seq=min(checkpoint.seq + 1, seq), end_seq=seq)
            if not envelopes or envelopes[-1].seq != seq:
                return None, {}
            event = envelope_json(envelopes[-1])
            return event, await asyncio.to_thread(_rebuilt, checkpoint, envelopes)
        finally:
            self.busy -= 1


def _rebuilt(checkpoint: Checkpoint, envelopes: list[Envelope]) -> dict[str, Any]:
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
