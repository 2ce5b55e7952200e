"""One chat as its reader takes it (see bus/nats/chat_session.py): its text in order, then how it ended."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.subscription import Subscription

from exojet.bus.chat_ends import ChatError, Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats.chunk_order import ChunkOrder
from exojet.bus.nats.follower import Follower
from exojet.bus.tools import ToolCallDelta

Piece = str | ToolCallDelta | ChoiceDelta
Item = Piece | Ended | ChatError
# How long a chat's end waits for its last chunks when its Complete status came first: the runner
# stores them before it writes the status, so they are on their way (the result's text fills
# what did not come, but not the tokens' log-probabilities of a chat that asked for them).
CHUNKS_GRACE_S = 2.0


class ChunksEnd:
    """The chat's closing chunk (`done`), in its place after every other."""


CHUNKS_END = ChunksEnd()


class ChatStream:
    """One chat as its reader takes it: `items` in order (text, then how it ended)."""

    def __init__(self, chat_id: str, emitter_task: str, command_id: str | None = None) -> None:
        self.chat_id = chat_id  # also its chunks' stream id
        self.emitter_task = emitter_task  # the task whose terminal status ends the chat
        self.command_id = command_id
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        # Set when rank 0's task is in the log, or the chat was refused or ended first.
        self.settled = asyncio.Event()
        self.refusal: ChatError | None = None
        self.tasks: dict[str, str] = {}  # task id -> runner id, every rank seen so far
        self.emitter: str | None = None  # the emitting task's runner
        self.instance_id: str | None = None
        # Since when the emitter's heartbeats are watched (None: not yet).
        self.watched_since: float | None = None
        self.on_status: Callable[[TaskStatusUpdated], None] | None = None
        self.over = False
        self.task_ended = False  # its emitting task's terminal status came
        self.abandoned: str | None = None
        self.abandoned_at = 0.0
        self.order: ChunkOrder[Piece | ChunksEnd] = ChunkOrder(self._take)
        self.subs: list[Follower | Subscription] = []
        self.chunks_ended = False
        # Its Complete status, held until its closing chunk was taken (CHUNKS_GRACE_S at most).
        self._ending: Ended | None = None

    def offer(self, index: int, piece: Piece | ChunksEnd) -> None:
        """A chunk from either way it comes (see `bus/chunk_order.py`): each index once, in order."""
        if not self.over or self._ending is not None:
            self.order.offer(index, piece)

    def _take(self, piece: Piece | ChunksEnd) -> None:
        if isinstance(piece, ChunksEnd):
            self.chunks_ended = True
            self._release()
        else:
            self.items.put_nowait(piece)

    def end(self, item: Ended | ChatError) -> None:
        if self.over:
            return
        self.over = True
        self.settled.set()
        if isinstance(item, Ended) and not self.chunks_ended:
            self._ending = item
            asyncio.get_running_loop().call_later(CHUNKS_GRACE_S, self._release)
        else:
            self.items.put_nowait(item)

    def _release(self) -> None:
        if self._ending is not None:
            self.items.put_nowait(self._ending)
            self._ending = None

    def refuse(self, error: ChatError) -> None:
        """End the chat before it was routed: `submit` raises `error`."""
        self.refusal = error
        self.over = True
        self.settled.set()
