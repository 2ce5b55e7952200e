"""Read a stream in order from a sequence on, each message once, through any outage.

Catching up (a supervisor start, `exojet replay`, a runner reading its own
subject) and following live are the same read here: a flow-controlled push
consumer (ack none, memory storage, removed by the server when we are gone)
delivering into an inbox of the nats-py connection, so it has that connection's
credentials, TLS, inbox prefix and JetStream API prefix. Each message carries
its consumer sequence: a gap, a heartbeat saying we missed something, a silent
consumer or a reconnect replaces the consumer with one starting right after the
last message handled, retried with capped backoff until the server takes it.

nats-py's ordered consumer does the same but resumes only after two missed
heartbeats (10 s or more, once, giving up if JetStream is not back yet) and
checks sequences in Python per message through its metadata parser.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from exojet.bus.envelope import Envelope, parse_ack_reply
from exojet.bus.nats.connection import TRANSIENT_ERRORS, backoff_delay, watch

Handler = Callable[[Envelope], Awaitable[None] | None]

IDLE_HEARTBEAT_S = 1.0
# Silent this many heartbeats: the consumer is gone (a server restart, say).
MISSED_HEARTBEATS = 3
# Removed by the server this long after we stop listening (a crash of ours).
INACTIVE_THRESHOLD_S = 30.0
# A consumer create answers in milliseconds; one unanswered this long went to a server or a
# stream leader that is gone (a cut-off host) and is asked again, not waited on for nats-py's 5 s.
CREATE_TIMEOUT_S = 2.0
_ACK_PREFIX = "$JS.ACK."


class Follower:
    """Calls `handler` for every message of `stream` on `subject` from `start_seq` on, in order, once each.

    With `end_seq` it stops there (`done` resolves); otherwise it follows live
    until `stop()`. `stop_on_error`: an exception from the handler ends the read
    (raised by `done`) instead of being logged.
    """

    def __init__(
        self,
        nc: NATS,
        handler: Handler,
        *,
        start_seq: int = 1,
        end_seq: int | None = None,
        subject: str = ">",
        stream: str,
        stop_on_error: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.handler = handler
        self.next_seq = max(start_seq, 1)
        self.end_seq = end_seq
        self.subject = subject
        self.stream = stream
        self.stop_on_error = stop_on_error
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.resumes = 0
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._expected_cseq = 1
        self._last_heard = time.monotonic()
        self._generation = 0
        self._resuming: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False
        self._deleting: set[asyncio.Future[None]] = set()
        self.log = logger.bind(stream=stream, subject=subject)

    @property
    def last_seq(self) -> int:
        """The last sequence handled (start_seq - 1 before any)."""
        return self.next_seq - 1

    async def start(self) -> Follower:
        if self.end_seq is not None and self.next_seq > self.end_seq:
            self._finish()
            return self
        watch(self.nc).on_reconnect(self._on_reconnect)
        attempt = 0
        while True:
            try:
                await self._open()
                break
            except TRANSIENT_ERRORS as err:  # the connection went while we asked: ask again
                self.log.debug(f"read consumer not created yet: {err!r}")
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
        self._watchdog = asyncio.ensure_future(self._watch_heartbeats())
        return self

    async def stop(self) -> None:
        """Stop reading and remove the consumer (the read's position stays in `next_seq`)."""
        self._stopped = True
        watch(self.nc).remove_listener(self._on_reconnect)
        for task in (self._watchdog, self._resuming):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._close()
        if not self.done.done():
            self.done.cancel()

    # nats-py's Subscription and ours stop alike.
    unsubscribe = stop

    async def _open(self) -> None:
        self._generation += 1
        generation = self._generation
        self._expected_cseq = 1
        inbox = self.nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation:
                await self._on_msg(msg)

        self._sub = await self.nc.subscribe(
            inbox, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024
        )
        try:
            info = await self.js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    # A name sends the create to `CONSUMER.CREATE.<stream>.<name>.<filter>`, where
                    # permissions check the filter (docs/security.md); a new one each time, as the
                    # server takes a known name with another start for an update it refuses.
                    name=f"read-{secrets.token_hex(8)}",
                    deliver_subject=inbox,
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.next_seq,
                    ack_policy=api.AckPolicy.NONE,
                    filter_subject=None if self.subject == ">" else self.subject,
                    flow_control=True,
                    idle_heartbeat=IDLE_HEARTBEAT_S,
                    inactive_threshold=INACTIVE_THRESHOLD_S,
                    mem_storage=True,
                    num_replicas=1,
                    description="exojet log read",
                ),
                timeout=CREATE_TIMEOUT_S,
            )
        except BaseException:
            await self._close()
            raise
        self._consumer = info.name
        self._last_heard = time.monotonic()

    async def _close(self, wait: bool = True) -> None:
        """Stop listening and delete the consumer; `wait=False` leaves the delete in the background
        (a resume: the consumer may have died with its server, whose delete then times out)."""
        sub, consumer = self._sub, self._consumer
        self._sub = self._consumer = None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as err:  # a closed connection has nothing left to unsubscribe
                self.log.debug(f"unsubscribe: {err!r}")
        if consumer is not None and self.nc.is_connected:
            deleting = asyncio.ensure_future(self._delete(consumer))
            if wait:
                await deleting
            else:
                self._deleting.add(deleting)
                deleting.add_done_callback(self._deleting.discard)

    async def _delete(self, consumer: str) -> None:
        try:
            await self.js.delete_consumer(self.stream, consumer)
        except Exception as err:  # the inactive threshold removes it anyway
            self.log.debug(f"could not delete read consumer {consumer}: {err!r}")

    async def _on_msg(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        reply = msg.reply
        if not reply.startswith(_ACK_PREFIX):
            await self._on_control(msg)
            return
        seq, cseq, time_ns = parse_ack_reply(reply)
        if cseq != self._expected_cseq:
            self._resume(f"consumer sequence jumped from {self._expected_cseq - 1} to {cseq}")
            return
        self._expected_cseq += 1
        if seq < self.next_seq:
            return
        if self.end_seq is not None and seq > self.end_seq:
            self._finish()
            return
        try:
            result = self.handler(Envelope(seq=seq, subject=msg.subject, data=msg.data, time=time_ns / 1e9))
            if result is not None:
                await result
        except Exception as err:
            if self.stop_on_error:
                self._fail(err)
                return
            # One bad handler call must not stop the read: log it with its place in the log.
            self.log.bind(seq=seq, subject=msg.subject).exception("handler failed on a log message")
        self.next_seq = seq + 1
        if self.end_seq is not None and seq >= self.end_seq:
            self._finish()

    async def _on_control(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if msg.reply:
            # A flow control request: answered once what came before it is handled (it is, we are in order).
            await self.nc.publish(msg.reply)
            return
        if stalled := headers.get("Nats-Consumer-Stalled"):
            await self.nc.publish(stalled)
        last_cseq = headers.get("Nats-Last-Consumer")
        if last_cseq is not None and int(last_cseq) > self._expected_cseq - 1:
            self._resume(f"the server delivered up to consumer sequence {last_cseq}, we saw {self._expected_cseq - 1}")

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.last_seq)
        self._ignore_the_rest()

    def _fail(self, err: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(err)
        self._ignore_the_rest()

    def _ignore_the_rest(self) -> None:
        # Not `stop()` from inside the message callback (unsubscribing cancels
        # the task running it): whoever awaits `done` stops the read.
        self._stopped = True
        self._generation += 1

    def _on_reconnect(self) -> None:
        self._resume("the connection to NATS came back")

    def _resume(self, why: str) -> None:
        """Replace the consumer with one starting after the last message handled (once at a time)."""
        if self._stopped or (self._resuming is not None and not self._resuming.done()):
            return
        # Messages of the old consumer still queued must not be taken for the new one's.
        self._generation += 1
        self.resumes += 1
        self.log.bind(seq=self.next_seq).info(f"log read resumes at seq {self.next_seq}: {why}")
        self._resuming = asyncio.ensure_future(self._reopen())

    async def _reopen(self) -> None:
        await self._close(wait=False)
        attempt = 0
        while not self._stopped:
            try:
                await self._open()
                return
            except Exception as err:  # JetStream may be a moment behind its server: try again
                self.log.bind(seq=self.next_seq).debug(f"read consumer not created yet: {err!r}")
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(IDLE_HEARTBEAT_S)
            silent = time.monotonic() - self._last_heard
            if silent > IDLE_HEARTBEAT_S * MISSED_HEARTBEATS and self.nc.is_connected:
                self._last_heard = time.monotonic()
                self._resume(f"no message or heartbeat for {silent:.1f} s")


async def read(follower: Follower, timeout: float) -> int:
    """Run a bounded read (`end_seq` set) to its end; returns the last sequence handled (0 if none)."""
    start = follower.next_seq
    await follower.start()
    try:
        last = await asyncio.wait_for(asyncio.shield(follower.done), timeout)
    except TimeoutError:
        raise TimeoutError(
            f"log read did not reach seq {follower.end_seq} within {timeout} s (next seq {follower.next_seq})"
        ) from None
    finally:
        await follower.stop()
    return last if last >= start else 0
