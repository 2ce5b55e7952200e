"""Streams generated text to `exo.chunks.<runner_id>.<stream_id>` without waiting on the bus per token.

Each token goes out at once with `publish_async` (its ack is collected, not awaited),
so a generation never stalls on a round trip. When the bus lags and
`MAX_UNACKED` chunks are unacknowledged, tokens are joined into the next chunk
instead of queueing, so per-token overhead stays small either way.

Through an outage the generation goes on and its text is held. What was sent
but not acknowledged before the connection went is published again first,
under its message id (`<task_id>:<index>`) and until stored, once the
connection is back: a connection loses a tail of what was sent, never a middle,
so the stream keeps the chunks in index order, each once, and a client
replaying `EXO_CHUNKS` misses nothing. A chunk refused while connected (a
restarted JetStream answers "no responders" until its streams are back) is
published again before any later one. `finish` does the same for the last ones.
"""

from __future__ import annotations

import asyncio

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.js.api import PubAck

from exojet.bus import subjects
from exojet.bus.chunks import Chunk
from exojet.bus.logprobs import Logprobs, TokenLogprob
from exojet.bus.nats import client, connection
from exojet.bus.results import FinishReason
from exojet.bus.tools import ToolCallDelta

MAX_UNACKED = 16
# How long to wait for outstanding acks before publishing those chunks again.
ACK_WAIT_S = 2.0


class ChunksNotStored(Exception):
    """EXO_CHUNKS refused a chunk (not a passing outage): a client replaying it would miss text."""


class _Sent:
    """One published chunk: what to publish again if its ack does not come."""

    def __init__(self, msg_id: str, payload: bytes, ack: asyncio.Future[PubAck] | None, outages: int) -> None:
        self.msg_id = msg_id
        self.payload = payload
        self.ack = ack
        # The connection's outage count when it was sent: an outage since may have lost it.
        self.outages = outages
        self.confirmed = False

    @property
    def pending(self) -> bool:
        return not self.confirmed and self.ack is not None and not self.ack.done()

    @property
    def failed(self) -> bool:
        """Not sent, or refused (JetStream still starting after a restart answers no responders)."""
        return self.ack is None or (not self.stored and self.ack.done())

    @property
    def stored(self) -> bool:
        if not self.confirmed and self.ack is not None and self.ack.done() and not self.ack.cancelled():
            self.confirmed = self.ack.exception() is None
        return self.confirmed


class ChunkStream:
    """One generation's chunks: `await add(text)` per token, then `await finish(reason)`."""

    def __init__(self, nc: NATS, runner_id: str, stream_id: str, task_id: str) -> None:
        self.js = nc.jetstream()
        self.connection = connection.watch(nc)
        self.subject = subjects.chunks_subject(runner_id, stream_id)
        self.task_id = task_id
        self.index = 0
        self.republished = 0
        # Per choice of `n`: the text and its tokens' log-probabilities held for the next chunk.
        self._held: dict[int, tuple[list[str], list[TokenLogprob]]] = {}
        self._sent: list[_Sent] = []
        # Every chunk before this index of `_sent` is stored.
        self._stored_upto = 0

    async def add(self, text: str, choice: int = 0, logprobs: Logprobs = ()) -> None:
        """Send `text` (of answer `choice`, made by the tokens `logprobs`) now, or hold it for the
        next chunk while the bus is behind or away."""
        if not text and not logprobs:
            return
        texts, held_logprobs = self._held.setdefault(choice, ([], []))
        texts.append(text)
        held_logprobs.extend(logprobs)
        if not self.connection.connected:
            return
        await self._repair()
        if sum(sent.pending for sent in self._sent[-MAX_UNACKED * 2 :]) < MAX_UNACKED:
            await self._send_held()

    async def add_tool_call(self, delta: ToolCallDelta) -> None:
        """Send a piece of a tool call in a chunk of its own, after the text held before it."""
        await self._repair()
        await self._send_held()
        await self._send(self._chunk("", tool_call=delta))

    async def finish(self, finish_reason: FinishReason) -> None:
        """Send what is held and the closing chunk `{done: true, finish_reason}`; return once all are stored.

        Both go out at once behind the chunks still unacknowledged (one round trip for the
        lot, not one each); whatever of them is not stored is then published again in order.
        """
        await self._repair()
        await self._send_held()
        await self._send(self._chunk("", done=True, finish_reason=finish_reason))
        await self._send_again()
        if self.republished:
            logger.bind(task_id=self.task_id).warning(
                f"{self.republished} chunks of {self.subject} published again after an outage"
            )

    def _chunk(
        self,
        text: str,
        done: bool = False,
        finish_reason: FinishReason | None = None,
        tool_call: ToolCallDelta | None = None,
        choice: int = 0,
        logprobs: Logprobs = (),
    ) -> tuple[str, bytes]:
        chunk = Chunk(
            task_id=self.task_id,
            index=self.index,
            text=text,
            done=done,
            finish_reason=finish_reason,
            tool_call=tool_call,
            choice=choice,
            logprobs=logprobs,
        )
        self.index += 1
        return f"{self.task_id}:{chunk.index}", msgspec.json.encode(chunk)

    def _open(self) -> list[_Sent]:
        """The chunks from the first not yet stored on (a short list while acks keep up)."""
        while self._stored_upto < len(self._sent) and self._sent[self._stored_upto].stored:
            self._stored_upto += 1
        return self._sent[self._stored_upto :]

    async def _repair(self) -> None:
        """Later chunks wait until every earlier one known lost or refused is stored: the
        stream keeps index order."""
        if any(sent.failed or (not sent.stored and sent.outages < self.connection.outages) for sent in self._open()):
            await self._send_again()

    async def _send_again(self) -> None:
        """Wait a little for outstanding acks, then publish again, in order, each chunk not stored."""
        pending = [sent.ack for sent in self._open() if sent.pending and sent.ack is not None]
        if pending:
            await asyncio.wait(pending, timeout=ACK_WAIT_S)
        for sent in self._open():
            if sent.stored:
                continue
            if sent.ack is not None:
                sent.ack.cancel()  # frees nats-py's slot for an ack that will not come
            self.republished += 1
            await self._store((sent.msg_id, sent.payload))
            sent.confirmed = True

    async def _store(self, chunk: tuple[str, bytes]) -> None:
        msg_id, payload = chunk
        try:
            await client.publish_until_stored(self.js, self.subject, payload, msg_id=msg_id)
        except Exception as err:
            raise ChunksNotStored(
                f"EXO_CHUNKS refused chunk {msg_id} of {self.subject}: {err!r}; "
                "check the NATS server and send the chat again"
            ) from err

    async def _send_held(self) -> None:
        held, self._held = self._held, {}
        for choice, (texts, logprobs) in sorted(held.items()):
            await self._send(self._chunk("".join(texts), choice=choice, logprobs=tuple(logprobs)))

    async def _send(self, chunk: tuple[str, bytes]) -> None:
        """Publish without waiting for the ack (collected later)."""
        msg_id, payload = chunk
        outages = self.connection.outages
        try:
            ack = await self.js.publish_async(self.subject, payload, headers={"Nats-Msg-Id": msg_id})
        except client.TRANSIENT_ERRORS:
            ack = None  # sent again once the connection is back
        self._sent.append(_Sent(msg_id, payload, ack, outages))
