"""Connecting to NATS so that no exojet process ever gives up on it.

nats-py's defaults block for minutes on a first connect and then give up after a
few reconnects. Here a connection, once made, reconnects for as long as it takes
(backoff 0.1 s doubling to at most `MAX_BACKOFF_S`), pings every `PING_INTERVAL_S`
so a dead server is noticed within seconds, and logs each change of state once
(not every attempt). `watch(nc)` tells how long the connection was away and lets
parts that hold server-side state (a consumer, a subscription's position) resume
the moment it is back.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import nats
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.errors import ConnectionReconnectingError, NoServersError, OutboundBufferLimitError
from nats.js.errors import ServiceUnavailableError

from exojet.bus.nats import connect_options
from exojet.bus.nats.connect_options import BadCredentials, ConnectOptions
from exojet.bus.nats.handshake import NatsRefused, NatsUnreachable, refusal
from exojet.bus.replies import ConnectionSummary

DEFAULT_URL = "nats://127.0.0.1:4222"
MAX_BACKOFF_S = 2.0
FIRST_BACKOFF_S = 0.1
# A server cut off (its host's link down) answers nothing and closes nothing: only a missed
# PONG tells. nats-py gives a connection up when a ping finds MAX_OUTSTANDING_PINGS unanswered,
# so a silent server is left 2-3 s after its last PONG: under a supervisor's 5 s heartbeat
# timeout, so a runner on a cut server is back on another before anyone declares it lost.
PING_INTERVAL_S = 1
MAX_OUTSTANDING_PINGS = 2
# Dialling one member of a cluster, once connected (and at the first connect to a list of
# several): a member that has not answered a LAN dial in this long is cut off, try the next.
DIAL_TIMEOUT_S = 2.0
# How long one try of a publish sent under a Nats-Msg-Id waits for its ack before it is sent again
# (the server drops a duplicate, so a retry is safe). A stream leader answers in milliseconds; a
# publish that went to a cut-off node's leader (still known to the other nodes' routes until they
# notice) gets no answer at all, and nats-py's 5 s made the next chat after a cut wait for the
# election rounded up to the next 5 s.
DEDUPED_PUBLISH_TRY_S = 1.0
# Once one server's credential check answered, the others' are waited for this much longer
# (a refusal comes within moments of the TCP accept; a cut-off member never answers at all).
CHECK_GRACE_S = 1.0

# What a publish raises while the server is away or restarting: worth trying again.
# (Not NoRespondersError: a single server recovers its streams before it takes
# clients, so no responders means the stream is missing, which waiting won't fix.)
TRANSIENT_ERRORS = (
    asyncio.TimeoutError,
    OutboundBufferLimitError,
    ConnectionReconnectingError,
    ServiceUnavailableError,
)

Listener = Callable[[], Awaitable[None] | None]


def backoff_delay(attempts: int) -> float:
    """Seconds to wait before reconnect attempt `attempts + 1`: doubling from 0.1 s, capped, jittered."""
    base: float = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(attempts, 10))
    return base * random.uniform(0.8, 1.0)


class ConnectionWatch:
    """One connection's history: when it went away, for how long, and who wants to hear it is back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.disconnected_at: float | None = None
        self.outages = 0
        self.last_outage_s = 0.0
        self.reconnected_at: float | None = None
        # Set while a first connect waits for a server, to say so once.
        self.waiting_for: str | None = None
        # Weak: the registry below is keyed by the connection and must not keep it alive.
        self.connection: weakref.ref[NATS] | None = None
        self._listeners: list[Listener] = []
        self._resuming: set[asyncio.Future[None]] = set()
        self.log = logger.bind(client=name)

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None

    def down_for(self) -> float:
        """Seconds since the connection went away (0 while connected)."""
        return 0.0 if self.disconnected_at is None else time.monotonic() - self.disconnected_at

    def summary(self) -> ConnectionSummary:
        """What `exojet state` shows of this connection."""
        return ConnectionSummary(
            connected=self.connected,
            outages=self.outages,
            last_outage_s=round(self.last_outage_s, 3),
            down_for_s=round(self.down_for(), 3),
        )

    def on_reconnect(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def disconnected(self) -> None:
        nc = self.connection() if self.connection is not None else None
        if nc is not None and nc.is_closed:
            return  # closed on purpose (nats-py calls this on close too)
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
            self.log.warning("disconnected from NATS; reconnecting until it is back")

    async def reconnected(self) -> None:
        now = time.monotonic()
        self.last_outage_s = now - (self.disconnected_at or now)
        self.outages += 1
        self.disconnected_at = None
        self.reconnected_at = now
        self.log.bind(outage_s=round(self.last_outage_s, 3)).warning(
            f"reconnected to NATS after {self.last_outage_s:.1f} s away"
        )
        for listener in list(self._listeners):
            try:
                result = listener()
            except Exception:
                # One part failing to resume must not keep the others from it.
                self.log.exception("a reconnect listener failed")
                continue
            if result is not None:
                # In the background: nats-py's reconnect must not wait on what a part does with it.
                task = asyncio.ensure_future(result)
                self._resuming.add(task)
                task.add_done_callback(self._resumed)

    def _resumed(self, task: asyncio.Future[None]) -> None:
        self._resuming.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.opt(exception=task.exception()).error("a reconnect listener failed")

    async def error(self, err: Exception) -> None:
        # While away, every failed attempt raises one of these: the disconnect
        # was logged once and the reconnect will be.
        (self.log.debug if self.disconnected_at is not None else self.log.warning)(f"nats: {err!r}")
        if self.waiting_for is not None:
            self.log.warning(f"no NATS server at {self.waiting_for} yet; waiting for one")
            self.waiting_for = None

    async def closed(self) -> None:
        self.log.debug("NATS connection closed")


_watches: weakref.WeakKeyDictionary[NATS, ConnectionWatch] = weakref.WeakKeyDictionary()


def watch(nc: NATS) -> ConnectionWatch:
    """The watch of a connection made by `connect` (a fresh one for any other)."""
    found = _watches.get(nc)
    if found is None:
        found = _watches[nc] = ConnectionWatch(nc.options.get("name") or "nats")
    return found


class _Dialer:
    """nats-py's reconnect hook: the member tried least in this outage (a cluster's members in
    turn), after a backoff, and among those the one just lost last.

    Counted here, per outage: nats-py's own counts keep what a first connect's wait for a server
    left (the member it got through to reset, the others high), so a least-tried choice by them
    dialled the member just lost again and again, each a whole dial timeout when it is cut off."""

    def __init__(self) -> None:
        self.tries: Counter[str] = Counter()

    def __call__(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        lost = f"{info.get('host')}:{info.get('port')}"
        server = min(servers, key=lambda s: (self.tries[s.uri.netloc], s.uri.netloc == lost))
        delay = backoff_delay(self.tries[server.uri.netloc])
        self.tries[server.uri.netloc] += 1
        return server, delay

    def reset(self) -> None:
        """Connected again: the next outage counts afresh."""
        self.tries.clear()


class BadNatsUrl(ValueError):
    """A `--nats` / `$NATS_URL` that names no server: said before anything connects."""


URL_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


def server_urls(url: str) -> list[str]:
    """The servers of a `--nats` value: comma-separated, as the `nats` CLI takes them
    (`nats://a:4222,nats://b:4222`; a bare `host:port` means `nats://host:port`)."""
    found = []
    for part in url.split(","):
        item = part.strip()
        if not item:
            continue
        full = item if "://" in item else f"nats://{item}"
        parsed = urlparse(full)
        try:
            port = parsed.port
        except ValueError:
            raise BadNatsUrl(f"{item!r} in --nats/NATS_URL has a bad port") from None
        if parsed.scheme not in URL_SCHEMES or not parsed.hostname:
            raise BadNatsUrl(
                f"{item!r} in --nats/NATS_URL is not a NATS server URL (nats://HOST:PORT, several comma-separated)"
            )
        found.append(full if port is not None else f"{full.rstrip('/')}:4222")
    if not found:
        raise BadNatsUrl(f"--nats/NATS_URL {url!r} names no server")
    return found


def default_url() -> str:
    """`$NATS_URL`, else the embedded server's default address."""
    return os.environ.get("NATS_URL") or DEFAULT_URL


async def connect(
    url: str | None = None,
    name: str = "exojet",
    *,
    wait: bool = False,
    first_attempts: int = 3,
    connect_timeout: float = 5.0,
    options: ConnectOptions | None = None,
) -> NATS:
    """Connect; once connected, never give up reconnecting.

    The first connect tries `first_attempts` times half a second apart and raises
    NatsUnreachable, naming the URL (a command a person typed should say so at
    once); with `wait` it tries until a server answers (a service starting
    before its server). `options` are the credentials and TLS files (default:
    what the CLI or the environment set, `connect_options.current()`); a server
    that refuses them raises NatsRefused, naming the problem, within
    `connect_timeout`, waiting or not (retrying would not help).
    """
    url = url or default_url()
    try:
        servers = server_urls(url)
    except BadNatsUrl as err:
        raise NatsUnreachable(str(err)) from None
    opts = options if options is not None else connect_options.current()
    try:
        auth = opts.nats_kwargs()
    except BadCredentials as err:
        raise NatsRefused(str(err)) from None
    # Checked first, on a connection of our own: nats-py can wait forever closing a socket
    # whose TLS handshake failed, and retries refused credentials as if the server were away.
    # Every server of a cluster is asked, at once (the first may be the one that is down).
    refused = await _first_refusal(servers, opts, connect_timeout)
    if refused is not None:
        raise refused
    # A list's member that does not answer is cut off or down: the next one is dialled sooner.
    dial_timeout = min(connect_timeout, DIAL_TIMEOUT_S) if len(servers) > 1 else connect_timeout
    connection = ConnectionWatch(name)
    dialer = _Dialer()
    connection.on_reconnect(dialer.reset)
    # Failed first attempts are raised to the caller (or awaited): not news to log.
    connection.disconnected_at = time.monotonic()
    connection.waiting_for = url if wait else None
    try:
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=dial_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1 if wait else first_attempts,
            reconnect_time_wait=0.5,
            reconnect_to_server_handler=dialer,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=connection.error,
            disconnected_cb=connection.disconnected,
            reconnected_cb=connection.reconnected,
            closed_cb=connection.closed,
            **auth,
        )
    except (NoServersError, OSError) as err:
        raise NatsUnreachable(
            f"cannot reach NATS at {url} ({err!r}); start a server with "
            "`exojet nats` or `exojet up`, or pass --nats / set NATS_URL"
        ) from None
    # From here on the connection is never abandoned (nats-py reads the option on each attempt).
    nc.options["max_reconnect_attempts"] = -1
    nc.options["connect_timeout"] = min(connect_timeout, DIAL_TIMEOUT_S)
    connection.disconnected_at = None
    connection.waiting_for = None
    connection.connection = weakref.ref(nc)
    _watches[nc] = connection
    return nc


async def _first_refusal(servers: list[str], opts: ConnectOptions, timeout: float) -> NatsRefused | None:
    """Why the servers refuse `opts`, None if they do not. Every server is asked at once (the
    first may be down or cut off); once one answered, the others get CHECK_GRACE_S more, so a
    silent member of a cluster costs a second, not the whole `timeout`."""
    checks = [asyncio.ensure_future(refusal(urlparse(s), opts, timeout)) for s in servers]
    try:
        done, pending = await asyncio.wait(checks, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            more, _ = await asyncio.wait(pending, timeout=CHECK_GRACE_S)
            done |= more
        return next((r for r in (c.result() for c in done) if r is not None), None)
    finally:
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)


async def close(nc: NATS) -> None:
    """Close the connection whatever its state (nats-py raises if the socket is already gone)."""
    if nc.is_closed:
        return
    try:
        await nc.close()
    except OSError as err:
        watch(nc).log.debug(f"closed a connection that was already lost: {err!r}")
