"""Streams generated text to `exo.chunks.<stream_id>`, batched by what the bus can take.

A publish is in flight at most once; tokens that arrive meanwhile are joined into
the next chunk. On a fast bus every token is its own chunk; when the bus lags,
chunks grow instead of queueing, so per-token overhead stays small either way.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.js import JetStreamContext

from bus import subjects


class ChunkStream:
    """One generation's chunks: `add(text)` per token, then `finish(reason)`."""

    def __init__(self, js: JetStreamContext, stream_id: str, task_id: str) -> None:
        self.js = js
        self.subject = subjects.chunks_subject(stream_id)
        self.task_id = task_id
        self.index = 0
        self._pending: list[str] = []
        self._inflight: asyncio.Task[None] | None = None

    def add(self, text: str) -> None:
        """Queue `text`; sends it now if nothing is in flight."""
        if text:
            self._pending.append(text)
            if self._inflight is None or self._inflight.done():
                self._inflight = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            await self._publish({"task_id": self.task_id, "index": self.index, "text": text})
            self.index += 1

    async def finish(self, finish_reason: str) -> None:
        """Send what is left, then the closing chunk `{done: true, finish_reason}`."""
        if self._inflight is not None:
            await self._inflight
        await self._drain()
        await self._publish({"task_id": self.task_id, "index": self.index, "text": "", "done": True,
                             "finish_reason": finish_reason})

    async def _publish(self, chunk: dict[str, object]) -> None:
        await self.js.publish(self.subject, msgspec.json.encode(chunk))
