"""The JetStream client wrapper: connect, fenced and deduplicated publish, replay."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from exojet.bus.codec import encode
from exojet.bus.envelope import Envelope
from exojet.bus.nats.connection import TRANSIENT_ERRORS as TRANSIENT_ERRORS
from exojet.bus.nats.connection import backoff_delay
from exojet.bus.nats.connection import close as close
from exojet.bus.nats.connection import connect as connect
from exojet.bus.nats.connection import default_url as default_url
from exojet.bus.nats.connection import watch as watch
from exojet.bus.nats.follower import Follower, Handler, read
from exojet.bus.nats.handshake import NatsRefused as NatsRefused
from exojet.bus.nats.handshake import NatsUnreachable as NatsUnreachable
from exojet.bus.streams import LOG_STREAM

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
WRONG_LAST_SEQUENCE = 10071
# ... and for "duplicate message id is in process".
MSG_ID_IN_PROCESS = 10158
# How long one publish tries through a stream without a leader: a cluster elects one in
# a few seconds; a single server with no stream never will.
# How long a publish is tried again through a stream's leader election (seconds; a loaded
# cluster has been seen to take over 20). A stream that is gone fails after as long.
ELECTION_S = 30.0

# How long one publish waits for its ack (nats-py's default).
PUBLISH_TIMEOUT_S = 5.0

T = TypeVar("T")


class WrongLastSequence(Exception):
    """Someone else wrote the subject since our last write: we are fenced out."""


def _headers(msg_id: str | None, expected_last_subject_seq: int | None) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    if expected_last_subject_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
    return headers or None


async def publish(
    js: JetStreamContext,
    subject: str,
    message: msgspec.Struct | dict[str, Any] | bytes,
    *,
    msg_id: str | None = None,
    expected_last_subject_seq: int | None = None,
    timeout: float = PUBLISH_TIMEOUT_S,
) -> api.PubAck:
    """Publish to the log and wait for the ack.

    `msg_id` is sent as `Nats-Msg-Id` (the server drops a duplicate within the
    window); `expected_last_subject_seq` fences the write (0 = subject empty) and
    raises WrongLastSequence when someone else wrote the subject meanwhile.
    """
    payload = message if isinstance(message, bytes) else encode(message)
    headers = _headers(msg_id, expected_last_subject_seq)
    # A stream whose leader was lost (a cluster electing a new one) answers "no responders":
    # nothing was stored, so trying again is safe. A timeout may hide a stored write, so it
    # is tried again only under a `msg_id` (the server drops the duplicate).
    retried = (NoStreamResponseError, *TRANSIENT_ERRORS) if msg_id is not None else (NoStreamResponseError,)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ELECTION_S
    attempt = 0
    while True:
        try:
            ack = await js.publish(subject, payload, timeout=timeout, headers=headers)
        except APIError as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                raise WrongLastSequence(f"{subject}: {err.description}") from None
            # On a replicated stream the same `msg_id` from another publisher (a second
            # supervisor) may still be on its way through the stream's consensus: ask again,
            # and the answer is the duplicate's.
            if err.err_code != MSG_ID_IN_PROCESS or loop.time() > deadline:
                raise
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1
        except retried:
            if loop.time() > deadline:
                raise
            if attempt == 0:
                logger.bind(subject=subject).info("stream not answering (a leader election?); publishing again")
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1
        else:
            # What a server promised to keep, for a soak to look for in the log (tests/test_soak.py).
            # A duplicate's seq is its first copy's, which another writer may have sent elsewhere.
            logger.bind(
                stream=ack.stream, seq=ack.seq, subject=subject, msg_id=msg_id, duplicate=bool(ack.duplicate)
            ).debug("stored")
            return ack


async def until_done(op: Callable[[], Awaitable[T]], what: str) -> T:
    """`await op()`, tried again with capped backoff for as long as NATS is away or restarting.

    Logs the first failure and the recovery, not every try.
    """
    attempt = 0
    while True:
        try:
            result = await op()
        except TRANSIENT_ERRORS as err:
            (logger.warning if attempt == 0 else logger.debug)(
                f"{what}: NATS did not answer ({err!r}); trying again until it does"
            )
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1
            continue
        if attempt:
            logger.info(f"{what}: done after {attempt + 1} tries")
        return result


async def publish_until_stored(
    js: JetStreamContext,
    subject: str,
    message: msgspec.Struct | dict[str, Any] | bytes,
    *,
    msg_id: str,
    expected_last_subject_seq: int | None = None,
) -> api.PubAck:
    """`publish`, tried again under the same `msg_id` while the server is away, for as long as it takes.

    A try the server stored but whose ack was lost comes back as a duplicate
    (same sequence); with `expected_last_subject_seq` it may instead fail the
    check against itself, which the caller reconciles (WrongLastSequence is
    raised as is).
    """
    return await until_done(
        lambda: publish(js, subject, message, msg_id=msg_id, expected_last_subject_seq=expected_last_subject_seq),
        f"write {msg_id} on {subject}",
    )


async def last_on_subject(js: JetStreamContext, subject: str, stream: str = LOG_STREAM) -> Envelope | None:
    """The newest message on `subject` (direct get), or None if there is none."""
    try:
        raw = await js.get_last_msg(stream, subject, direct=True)
    except NotFoundError:
        return None
    return Envelope(seq=raw.seq or 0, subject=raw.subject or subject, data=raw.data or b"")


async def last_seq(js: JetStreamContext, stream: str = LOG_STREAM) -> int:
    """The stream's newest sequence (0 when empty)."""
    info = await js.stream_info(stream)
    return info.state.last_seq


async def follow(
    nc: NATS,
    handler: Handler,
    *,
    start_seq: int = 1,
    subject: str = ">",
    stream: str = LOG_STREAM,
) -> Follower:
    """Call `handler` for every message from `start_seq` on, live, in order, each once,
    through disconnects and server restarts; `await result.stop()` ends it."""
    return await Follower(nc, handler, start_seq=start_seq, subject=subject, stream=stream).start()


async def replay(
    nc: NATS,
    handler: Handler,
    *,
    start_seq: int = 1,
    end_seq: int | None = None,
    stream: str = LOG_STREAM,
    timeout: float = 600.0,
) -> int:
    """Call `handler` for every message from `start_seq` to `end_seq` (at most the
    stream's last sequence now), in order; return the last sequence handled (0 if none).
    An exception from `handler` stops the read and is raised here."""
    last = await last_seq(nc.jetstream(), stream)
    end = last if end_seq is None else min(end_seq, last)
    follower = Follower(nc, handler, start_seq=start_seq, end_seq=end, stream=stream, stop_on_error=True)
    return await read(follower, timeout)


async def replay_subject(
    nc: NATS,
    subject: str,
    handler: Handler,
    *,
    start_seq: int = 1,
    stream: str = LOG_STREAM,
    timeout: float = 120.0,
) -> int:
    """Call `handler` for every message on `subject` from `start_seq` so far, in order; returns
    the last seq (0 if none)."""
    last = await last_on_subject(nc.jetstream(), subject, stream)
    if last is None or last.seq < start_seq:
        return 0
    follower = Follower(
        nc, handler, start_seq=start_seq, end_seq=last.seq, subject=subject, stream=stream, stop_on_error=True
    )
    return await read(follower, timeout)
