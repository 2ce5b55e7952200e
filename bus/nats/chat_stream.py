"""One chat as its reader takes it (see bus/nats/chat_session.py): its text in order, then how it ended."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.subscription import Subscription

from exojet.bus.chat_ends import ChatError, Ended
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats.chunk_order import ChunkOrder
from exojet.bus.nats.follower import Follower
from exojet.bus.tools import ToolCallDelta

Item = str | ToolCallDelta | Ended | ChatError


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
        self.order: ChunkOrder[str | ToolCallDelta] = ChunkOrder(lambda text: self.items.put_nowait(text))
        self.subs: list[Follower | Subscription] = []

    def offer(self, index: int, text: str | ToolCallDelta) -> None:
        """A chunk from either way it comes (see `bus/chunk_order.py`): each index once, in order."""
        if not self.over:
            self.order.offer(index, text)

    def end(self, item: Ended | ChatError) -> None:
        if not self.over:
            self.over = True
            self.items.put_nowait(item)
            self.settled.set()

    def refuse(self, error: ChatError) -> None:
        """End the chat before it was routed: `submit` raises `error`."""
        self.refusal = error
        self.over = True
        self.settled.set()
