"""The runner's fenced writes when their caller stops waiting for one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.codec import decode_event
from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import RunnerIdle, RunnerReady, RunnerStatus
from exojet.runner.event_writer import EventWriter
from exojet.runner.write_chain import Fenced, WriteChain
from tests.tcp_proxy import NatsProxy

pytestmark = pytest.mark.timeout(60)

SUBJECT = subjects.runner_events_subject("r1")


def status(runner_status: RunnerStatus) -> Callable[[str, int, float], RunnerStatusUpdated]:
    return lambda eid, inc, at: RunnerStatusUpdated(
        event_id=eid, runner_id="r1", incarnation=inc, at=at, runner_status=runner_status
    )


async def event_ids(nc: NATS) -> list[str]:
    found: list[str] = []
    await client.replay(
        nc, lambda env: found.append(decode_event(env.data).event_id) if env.subject == SUBJECT else None
    )
    return found


async def test_a_write_stored_after_its_caller_was_cancelled_does_not_fence_the_next(
    nats_server: NatsServer,
) -> None:
    """A runner stopped mid-write (SIGTERM during a task) writes its last words after it."""
    proxy = NatsProxy(nats_server.port)
    nc = await client.connect(await proxy.start(), name="writer")
    try:
        js = nc.jetstream()
        await stream_setup.ensure_streams(js)
        writer = EventWriter(js, WriteChain("r1", 1, 0, time.time))
        await writer.write(status(RunnerIdle()))
        # The next write is stored, its ack lost with the connection; its caller gives up on it.
        proxy.drop_next_ack()
        cut = asyncio.ensure_future(writer.write(status(RunnerReady())))
        async with asyncio.timeout(10):
            while proxy.acks_dropped == 0:
                await asyncio.sleep(0.01)  # poll the proxy: the drop has no event to wait on
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
        seq = await writer.write(status(RunnerIdle()))
        assert seq == writer.last_seq
        assert await event_ids(nc) == ["r1:1:1", "r1:1:2", "r1:1:3"]
        # A write by another incarnation still fences it.
        twin = RunnerStatusUpdated(
            event_id="r1:2:1", runner_id="r1", incarnation=2, at=time.time(), runner_status=RunnerIdle()
        )
        await client.publish(js, SUBJECT, twin, msg_id="r1:2:1", expected_last_subject_seq=seq)
        with pytest.raises(Fenced) as fenced:
            await writer.write(status(RunnerReady()))
        assert fenced.value.incarnation == 2 and not fenced.value.lost
    finally:
        await nc.close()
