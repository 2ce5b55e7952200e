"""The JetStream client wrapper: connect, fenced and deduplicated publish, replay."""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import msgspec
import nats
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoServersError
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from exojet.bus import connect_options, log_reader
from exojet.bus.codec import encode
from exojet.bus.connect_options import BadCredentials, ConnectOptions
from exojet.bus.envelope import Envelope, parse_ack_reply
from exojet.bus.handshake import NatsRefused, NatsUnreachable, refusal
from exojet.bus.log_reader import Handler
from exojet.bus.streams import LOG_STREAM

DEFAULT_URL = "nats://127.0.0.1:4222"
# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
WRONG_LAST_SEQUENCE = 10071


__all__ = ["NatsRefused", "NatsUnreachable", "WrongLastSequence", "connect"]


class WrongLastSequence(Exception):
    """Someone else wrote the subject since our last write: we are fenced out."""


def default_url() -> str:
    """`$NATS_URL`, else the embedded server's default address."""
    return os.environ.get("NATS_URL") or DEFAULT_URL


async def connect(
    url: str | None = None,
    name: str = "exojet",
    *,
    connect_timeout: float = 5.0,
    reconnect_attempts: int = 3,
    on_closed: Callable[[], None] | None = None,
    options: ConnectOptions | None = None,
) -> NATS:
    """Connect with bounded retries (nats-py would otherwise block ~2 minutes).

    `options` are the credentials and TLS files (default: what the CLI or the
    environment set, `connect_options.current()`). Raises NatsUnreachable, naming
    the URL, when no server answers, and NatsRefused, naming the problem (an
    untrusted certificate, no key, a key the server does not know), when it
    refuses us, within `connect_timeout`. `on_closed`
    runs when the connection is gone for good (`reconnect_attempts` half a
    second apart), so a long-running process can stop instead of idling
    forever without a server.
    """
    connected = False

    async def on_error(err: Exception) -> None:
        # Before the first connect the failure is raised to the caller; logging
        # each attempt as well would only repeat it.
        (logger.bind(client=name).warning if connected else logger.bind(client=name).debug)(f"nats: {err!r}")

    opts = options if options is not None else connect_options.current()
    try:
        auth = opts.nats_kwargs()
    except BadCredentials as err:
        raise NatsRefused(str(err)) from None
    target = url or default_url()
    # Checked first, on a connection of our own: nats-py can wait forever closing a socket
    # whose TLS handshake failed, and retries refused credentials as if the server were away.
    first = target.split(",")[0].strip()
    refused = await refusal(urlparse(first if "://" in first else f"nats://{first}"), opts, connect_timeout)
    if refused is not None:
        raise refused
    try:
        nc = await nats.connect(
            target,
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=reconnect_attempts,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=on_error,
            closed_cb=_closed_callback(on_closed),
            **auth,
        )
    except (NoServersError, OSError) as err:
        raise NatsUnreachable(
            f"cannot reach NATS at {target} ({err!r}); start a server with "
            "`exojet nats` or `exojet up`, or pass --nats / set NATS_URL"
        ) from None
    connected = True
    connect_options.remember(nc, opts)
    return nc


def _closed_callback(on_closed: Callable[[], None] | None) -> Callable[[], Awaitable[None]] | None:
    if on_closed is None:
        return None

    async def closed() -> None:
        on_closed()

    return closed


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
    timeout: float = 5.0,
) -> api.PubAck:
    """Publish to the log and wait for the ack.

    `msg_id` is sent as `Nats-Msg-Id` (the server drops a duplicate within the
    window); `expected_last_subject_seq` fences the write (0 = subject empty) and
    raises WrongLastSequence when someone else wrote the subject meanwhile.
    """
    payload = message if isinstance(message, bytes) else encode(message)
    try:
        return await js.publish(subject, payload, timeout=timeout, headers=_headers(msg_id, expected_last_subject_seq))
    except APIError as err:
        if err.err_code == WRONG_LAST_SEQUENCE:
            raise WrongLastSequence(f"{subject}: {err.description}") from None
        raise


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


class _FreshlyNamed(api.ConsumerConfig):
    """A consumer config that takes a new name each time nats-py creates the consumer from it.

    A name makes nats-py create through `CONSUMER.CREATE.<stream>.<name>.<filter>`, so
    permissions can restrict the filter; the stream-wide create carries the name in its
    body, where it could take over a runner's queue, and is allowed to admin only. A
    new name per creation, because nats-py recreates an ordered consumer (after a gap
    or a reconnect) from the same config, and under the old name the server would
    take that as an update of a start sequence, which it refuses.
    """

    def evolve(self, **params: Any) -> _FreshlyNamed:
        return replace(self, name=f"follow-{secrets.token_hex(8)}", **params)


def _envelope(msg: Msg) -> Envelope:
    seq, _, time_ns = parse_ack_reply(msg.reply)
    return Envelope(seq=seq, subject=msg.subject, data=msg.data, time=time_ns / 1e9)


async def follow(
    js: JetStreamContext,
    handler: Handler,
    *,
    start_seq: int = 1,
    subject: str = ">",
    stream: str = LOG_STREAM,
) -> Subscription:
    """Call `handler` for every message from `start_seq` on, live, in order.

    An ordered consumer: flow-controlled, gap-free and recreated by the client
    after a disconnect, so no message is skipped or seen twice out of order.
    """

    async def on_msg(msg: Msg) -> None:
        env = _envelope(msg)
        try:
            result = handler(env)
            if result is not None:
                await result
        except Exception:
            # One bad handler call must not stop the follow: log it with its place in the log.
            logger.bind(seq=env.seq, subject=env.subject).exception("handler failed on a log message")

    return await js.subscribe(
        subject,
        stream=stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        config=_FreshlyNamed(opt_start_seq=max(start_seq, 1)),
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1024 * 1024 * 1024,
    )


async def replay(
    js: JetStreamContext,
    handler: Handler,
    *,
    start_seq: int = 1,
    end_seq: int | None = None,
    stream: str = LOG_STREAM,
    timeout: float = 600.0,
) -> int:
    """Call `handler` for every message from `start_seq` to `end_seq` (at most the
    stream's last sequence now), in order; return the last sequence handled (0 if none)."""
    last = await last_seq(js, stream)
    end = last if end_seq is None else min(end_seq, last)
    return await log_reader.read_range(js, stream, handler, start_seq, end, timeout=timeout)


async def replay_subject(
    js: JetStreamContext,
    subject: str,
    handler: Handler,
    *,
    start_seq: int = 1,
    stream: str = LOG_STREAM,
    timeout: float = 120.0,
) -> int:
    """Call `handler` for every message on `subject` from `start_seq` so far, in order; returns
    the last seq (0 if none)."""
    last = await last_on_subject(js, subject, stream)
    if last is None or last.seq < start_seq:
        return 0
    return await log_reader.read_range(js, stream, handler, start_seq, last.seq, subject=subject, timeout=timeout)
