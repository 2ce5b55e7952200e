"""Streams generated text to `exo.chunks.<runner_id>.<stream_id>` without waiting on the bus per token.

Each token goes out at once with `publish_async` (its ack is collected, not awaited),
so a generation never stalls on a round trip. When the bus lags and
`MAX_UNACKED` chunks are unacknowledged, tokens are joined into the next chunk
instead of queueing, so per-token overhead stays small either way. `finish` sends
the closing chunk and waits for every ack: a chunk the stream did not store fails
the generation instead of vanishing.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.js import JetStreamContext
from nats.js.api import PubAck

from exojet.bus import subjects

MAX_UNACKED = 16
ACK_TIMEOUT_S = 10.0


class ChunksNotStored(Exception):
    """EXO_CHUNKS did not acknowledge every chunk: a client replaying it would miss text."""


class ChunkStream:
    """One generation's chunks: `await add(text)` per token, then `await finish(reason)`."""

    def __init__(self, js: JetStreamContext, runner_id: str, stream_id: str, task_id: str) -> None:
        self.js = js
        self.subject = subjects.chunks_subject(runner_id, stream_id)
        self.task_id = task_id
        self.index = 0
        self._held: list[str] = []
        self._unacked: list[asyncio.Future[PubAck]] = []

    async def add(self, text: str) -> None:
        """Send `text` now, or hold it for the next chunk while the bus is behind."""
        if not text:
            return
        self._held.append(text)
        self._unacked = [ack for ack in self._unacked if not ack.done() or ack.exception() is not None]
        if sum(not ack.done() for ack in self._unacked) < MAX_UNACKED:
            await self._send_held()

    async def finish(self, finish_reason: str) -> None:
        """Send what is held and the closing chunk `{done: true, finish_reason}`; wait for all acks."""
        await self._send_held()
        await self._publish(
            {"task_id": self.task_id, "index": self.index, "text": "", "done": True, "finish_reason": finish_reason}
        )
        try:
            await asyncio.wait_for(asyncio.gather(*self._unacked), ACK_TIMEOUT_S)
        except Exception as err:
            raise ChunksNotStored(
                f"the chunks of {self.subject} were not all stored in EXO_CHUNKS: {err!r}; "
                "check the NATS server and send the chat again"
            ) from err

    async def _send_held(self) -> None:
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            await self._publish({"task_id": self.task_id, "index": self.index, "text": text})
            self.index += 1

    async def _publish(self, chunk: dict[str, object]) -> None:
        self._unacked.append(await self.js.publish_async(self.subject, msgspec.json.encode(chunk)))
