"""The generations an engine child runs at once, seen from the parent: each one's reply queue by
request id, the ones abandoned before their terminal reply, and whether another request may go.

A generation is opened with its number (`next_request_id`); the reader hands every reply tagged
with a number to `dispatch`; a generation closed before its terminal reply is abandoned until the
child sends it (a Cancel makes it come within a token), and dropped; a crash ends every one.
"""

from __future__ import annotations

import asyncio

from exojet.runner.engine_protocol import Done, Reply, RequestFailed, Token, ToolCallChunk

GenerationReply = Token | ToolCallChunk | Done | RequestFailed


class Generations:
    def __init__(self) -> None:
        self._queues: dict[int, asyncio.Queue[GenerationReply | Exception]] = {}
        self._abandoned: set[int] = set()
        self._last_id = 0
        # No generation abandoned and still owing its terminal reply.
        self.none_abandoned = asyncio.Event()
        self.none_abandoned.set()
        # No generation under way or owed: a request that is not a generation may go.
        self.idle = asyncio.Event()
        self.idle.set()

    def next_request_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def open(self, request_id: int) -> asyncio.Queue[GenerationReply | Exception]:
        """Generation `request_id` starts: the queue its replies (or the crash) come to."""
        replies: asyncio.Queue[GenerationReply | Exception] = asyncio.Queue()
        self._queues[request_id] = replies
        self._changed()
        return replies

    def close(self, request_id: int, abandoned: bool) -> None:
        """Generation `request_id` is done with; `abandoned`: before its terminal reply, which
        the child still owes."""
        del self._queues[request_id]
        if abandoned:
            self._abandoned.add(request_id)
        self._changed()

    def dispatch(self, reply: Reply) -> bool:
        """Hand a generation's reply to its queue (or drop an abandoned one's); False if
        `reply` belongs to no generation."""
        if not isinstance(reply, GenerationReply) or not reply.request_id:
            return False
        if (replies := self._queues.get(reply.request_id)) is not None:
            replies.put_nowait(reply)
        elif not isinstance(reply, Token | ToolCallChunk) and reply.request_id in self._abandoned:
            self._abandoned.discard(reply.request_id)
            self._changed()
        return True

    def end_all(self, crash: Exception | None) -> None:
        """The child is gone (`crash`, handed to every generation) or replaced (None): nothing is owed."""
        if crash is not None:
            for replies in self._queues.values():
                replies.put_nowait(crash)
        else:
            self._queues.clear()
        self._abandoned.clear()
        self._changed()

    def _changed(self) -> None:
        for event, busy in ((self.none_abandoned, self._abandoned), (self.idle, self._queues or self._abandoned)):
            if busy:
                event.clear()
            else:
                event.set()
