"""A runner incarnation's start: twin detection, `RunnerRegistered`, and what the
runner id's own subject says about earlier incarnations' tasks.

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
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from exojet.bus import streams, subjects
from exojet.bus.codec import BadInput, decode_event
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerLost, RunnerRegistered, RunnerStatusUpdated
from exojet.bus.lifecycle import FINAL_STATUSES
from exojet.bus.nats import client
from exojet.bus.nats.connection import server_urls
from exojet.bus.statuses import status_name
from exojet.runner.event_writer import EventWriter
from exojet.runner.task_history import TaskHistory

VERSION = "0.1.0"
# A twin shows itself by heartbeating: wait a little over two beats for one.
TWIN_HEARTBEAT_WAIT_S = 2.5


class TwinRunning(Exception):
    """Another live process holds this runner id."""


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


async def register(
    nc: NATS,
    runner_id: str,
    address: str,
    engine_setup: str,
    engines: Sequence[str],
    ring_key: str,
    after_loss: bool = False,
    history: TaskHistory | None = None,
) -> EventWriter:
    """Write `RunnerRegistered` for incarnation + 1 (with the engines it has and their CPU setup), fenced on the
    subject's last write; returns the new incarnation's writer. Raises `TwinRunning` if another process holds the id
    (not after a loss: then the previous holder is this very process).

    With `history`, everything on the subject up to the write it is fenced on is folded into it first:
    a RunnerLost, or a late write of the crashed incarnation, may have landed since the history was read
    (the twin check alone waits seconds), and the history must say what the log says."""
    js = nc.jetstream()
    subject = subjects.runner_events_subject(runner_id)
    last = await client.last_on_subject(js, subject)
    if last is not None and not after_loss and not _final(_decoded(last)) and await _heartbeat_seen(nc, runner_id):
        raise TwinRunning(f"runner {runner_id} is already running (incarnation {_incarnation(last)})")
    while history is not None and last is not None and last.seq > history.seq:
        await fold_subject(nc, runner_id, history, history.seq + 1)
        last = await client.last_on_subject(js, subject)
    incarnation, last_seq = (_incarnation(last), last.seq) if last is not None else (0, 0)
    writer = EventWriter(js, runner_id, incarnation + 1, last_seq)
    memory = psutil.virtual_memory()
    await writer.write(
        lambda eid, inc, at: RunnerRegistered(
            event_id=eid,
            runner_id=runner_id,
            incarnation=inc,
            at=at,
            host=socket.gethostname(),
            pid=os.getpid(),
            memory_total=memory.total,
            memory_free=memory.available,
            engine=engines[0] if engines else "",
            engine_setup=engine_setup,
            engines=tuple(engines),
            version=VERSION,
            address=address,
            ring_key=ring_key,
        )
    )
    return writer


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


def _decoded(env: Envelope) -> object:
    try:
        return decode_event(env.data)
    except BadInput:
        return None


def _incarnation(env: Envelope) -> int:
    return getattr(_decoded(env), "incarnation", 0)


def _final(event: object) -> bool:
    """True if `event` ends an incarnation: nothing of it can still be running."""
    if isinstance(event, RunnerLost):
        return True
    return isinstance(event, RunnerStatusUpdated) and status_name(event.runner_status) in FINAL_STATUSES


async def load_history(nc: NATS, runner_id: str, history: TaskHistory) -> int:
    """Fold this runner id's own subject into `history`: tasks already finished, and tasks an
    earlier incarnation started and never finished (it crashed meanwhile); returns the seq read from.

    The task consumer's ack floor is the checkpoint: every task at or below it was acknowledged
    (after its terminal status) and is never delivered again, and every status of a task above
    it was written after that task, so the subject from the floor on is all the dedupe needs."""
    start = await _ack_floor(nc.jetstream(), runner_id) + 1
    history.seq = max(history.seq, start - 1)
    await fold_subject(nc, runner_id, history, start)
    return start


async def fold_subject(nc: NATS, runner_id: str, history: TaskHistory, start_seq: int) -> None:
    """Fold the runner id's subject from `start_seq` to its current end into `history`."""

    def collect(env: Envelope) -> None:
        decoded = _decoded(env)
        history.apply(decoded, env.seq)

    await client.replay_subject(nc, subjects.runner_events_subject(runner_id), collect, start_seq=start_seq)


async def _ack_floor(js: JetStreamContext, runner_id: str) -> int:
    """The stream seq up to which this runner's task consumer has acknowledged everything (0: no consumer)."""
    try:
        info = await js.consumer_info(streams.LOG_STREAM, streams.task_consumer_name(runner_id))
    except NotFoundError:
        return 0
    return info.ack_floor.stream_seq if info.ack_floor is not None else 0
