"""A runner incarnation's start with NATS: the steps `RunnerCore.start` and `register`
(`runner/handling.py`) ask for, and the facts of this process it registers.

A new incarnation writes `RunnerRegistered` fenced on the subject's last write.
Before that it makes sure no other live process holds the runner id: unless the
last incarnation ended (Shutdown, or declared lost), a heartbeat on the id's
subject means a twin is running, and this process must not start.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import psutil
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from exojet import __version__
from exojet.bus import streams, subjects
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerRegistered
from exojet.bus.nats import client
from exojet.bus.nats.connection import server_urls
from exojet.runner.event_writer import EventWriter
from exojet.runner.handling import RunnerCore
from exojet.runner.steps import AckFloor, HeartbeatSeen, ReadSubject, Say, Write
from exojet.runner.write_chain import Build, LastOn

# A twin shows itself by heartbeating: wait a little over two beats for one.
TWIN_HEARTBEAT_WAIT_S = 2.5

RegistrationStep = Write | AckFloor | ReadSubject | HeartbeatSeen | LastOn | Say


def advertised_address(nats_url: str) -> str:
    """The local address on the route to the NATS server: what other ranks can reach."""
    if env := os.environ.get("EXO_RUNNER_ADDRESS"):
        return env
    # The first server of a list: on one network, any member's route leaves by the same address.
    url = urlsplit(server_urls(nats_url)[0])
    try:
        # A UDP "connect" sends nothing; it only asks the kernel for the route.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((url.hostname or "127.0.0.1", url.port or 4222))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def registration(runner_id: str, address: str, engine_setup: str, engines: Sequence[str], ring_key: str) -> Build:
    """The `RunnerRegistered` of each incarnation of this process: its host, memory (as it is
    when the incarnation registers), engines and their CPU setup, address and ring key."""

    def build(event_id: str, incarnation: int, at: float) -> RunnerRegistered:
        memory = psutil.virtual_memory()
        return RunnerRegistered(
            event_id=event_id,
            runner_id=runner_id,
            incarnation=incarnation,
            at=at,
            host=socket.gethostname(),
            pid=os.getpid(),
            memory_total=memory.total,
            memory_free=memory.available,
            engine=engines[0] if engines else "",
            engine_setup=engine_setup,
            engines=tuple(engines),
            version=__version__,
            address=address,
            ring_key=ring_key,
        )

    return build


class SubjectIO:
    """Does the steps of a runner's start and registration with NATS: its consumer's ack
    floor, its own subject, heartbeats under its id, its fenced writes, and its log lines."""

    def __init__(self, nc: NATS, core: RunnerCore) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.core = core
        self._writer: EventWriter | None = None
        self.log = logger.bind(runner_id=core.runner_id)

    def writer(self) -> EventWriter:
        """The current incarnation's writer (a new one with each registration)."""
        chain = self.core.chain
        assert chain is not None, "a runner writes only once registered"
        if self._writer is None or self._writer.chain is not chain:
            self._writer = EventWriter(self.js, chain)
        return self._writer

    async def do(self, step: RegistrationStep) -> object:
        runner_id = self.core.runner_id
        match step:
            case Write(build=build):
                return await self.writer().write(build)
            case AckFloor():
                return await client.until_done(lambda: _ack_floor(self.js, runner_id), "read this runner's ack floor")
            case ReadSubject(start_seq=start_seq):
                return await client.until_done(
                    lambda: _read_subject(self.nc, runner_id, start_seq), "read this runner's history"
                )
            case HeartbeatSeen():
                return await _heartbeat_seen(self.nc, runner_id)
            case LastOn(subject=subject):
                return await client.until_done(
                    lambda: client.last_on_subject(self.js, subject), f"read the last message of {subject}"
                )
            case Say(level=level, text=text, binds=binds, error=error):
                self.log.bind(**binds).opt(exception=error).log(level.upper(), text)
                return None
        raise TypeError(f"not a registration step: {step!r}")


async def _heartbeat_seen(nc: NATS, runner_id: str) -> bool:
    seen = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        seen.set()

    sub = await nc.subscribe(subjects.heartbeat_subject(runner_id), cb=on_beat)
    try:
        await asyncio.wait_for(seen.wait(), TWIN_HEARTBEAT_WAIT_S)
        return True
    except TimeoutError:
        return False
    finally:
        await sub.unsubscribe()


async def _read_subject(nc: NATS, runner_id: str, start_seq: int) -> list[Envelope]:
    """The runner id's subject from `start_seq` to its current end."""
    envelopes: list[Envelope] = []
    await client.replay_subject(nc, subjects.runner_events_subject(runner_id), envelopes.append, start_seq=start_seq)
    return envelopes


async def _ack_floor(js: JetStreamContext, runner_id: str) -> int:
    """The stream seq up to which this runner's task consumer has acknowledged everything (0: no consumer)."""
    try:
        info = await js.consumer_info(streams.LOG_STREAM, streams.task_consumer_name(runner_id))
    except NotFoundError:
        return 0
    return info.ack_floor.stream_seq if info.ack_floor is not None else 0
