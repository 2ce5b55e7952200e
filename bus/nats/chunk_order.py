"""A chat's chunks as a reader takes them: each index once, in order, whichever way it came.

A reader gets a chat's chunks two ways at once: a core subscription of the chat's subject
brings them as the runner publishes them (before the store's fsync and its delivery, a
round trip on every first token), and a follow of `EXO_CHUNKS` brings them once stored,
filling what the subscription missed (a reconnect, a slow consumer). A chunk stored again
after an outage comes a second time too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from exojet.bus.chunks import decode_chunk
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.nats.follower import Follower
from exojet.bus.streams import CHUNKS_STREAM

# What a chunk brings its reader: its text (or, to a reader of tool calls, a piece of one).
P = TypeVar("P")


class ChunkOrder(Generic[P]):
    """Passes each chunk's text to `on_text` once, in index order: a chunk that came ahead waits
    for the one before it, one taken already (the other way's copy) is dropped."""

    def __init__(self, on_text: Callable[[P], None]) -> None:
        self.on_text = on_text
        self.next_index = 0
        self._ahead: dict[int, P] = {}

    def offer(self, index: int, text: P) -> None:
        if index < self.next_index:
            return
        self._ahead[index] = text
        while self.next_index in self._ahead:
            text = self._ahead.pop(self.next_index)
            self.next_index += 1
            if text:
                self.on_text(text)


async def read_chunks(nc: NATS, subject: str, on_text: Callable[[str], None]) -> list[Follower | Subscription]:
    """Read the chunks on `subject` both ways into `on_text` (see `ChunkOrder`), from the
    first stored on; unsubscribe each of the returned when done. Subscribed before the
    chat's command is published, nothing of it goes unseen."""
    order: ChunkOrder[str] = ChunkOrder(on_text)

    def take(data: bytes) -> None:
        try:
            chunk = decode_chunk(data)
        except msgspec.DecodeError as err:
            logger.warning(f"a message on {subject} is not a chunk: {err}")
            return
        order.offer(chunk.index, chunk.text)

    async def published(msg: Msg) -> None:
        take(msg.data)

    def stored(env: Envelope) -> None:
        take(env.data)

    fast = await nc.subscribe(subject, cb=published)
    return [fast, await client.follow(nc, stored, subject=subject, stream=CHUNKS_STREAM)]
