"""The runner's fenced writes: a status pair in one round trip, as safe as two writes."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import client, streams, subjects
from exojet.bus.codec import decode_event
from exojet.bus.events import RunnerEvent, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.server import NatsServer
from exojet.bus.statuses import RunnerReady, RunnerRunning, TaskStatus
from exojet.runner.event_writer import Build, EventWriter, Fenced
from tests.tcp_proxy import NatsProxy

pytestmark = pytest.mark.timeout(60)

SUBJECT = subjects.runner_events_subject("r1")


def runner_status(status: RunnerRunning | RunnerReady) -> Build:
    return lambda eid, inc, at: RunnerStatusUpdated(
        event_id=eid, runner_id="r1", incarnation=inc, at=at, runner_status=status
    )


def task_status(status: TaskStatus) -> Build:
    return lambda eid, inc, at: TaskStatusUpdated(
        event_id=eid, runner_id="r1", incarnation=inc, at=at, task_id="t1", task_status=status
    )


async def subject_events(nc: NATS) -> list[tuple[int, RunnerEvent]]:
    """(seq, event) of every message on r1's subject, in stream order."""
    found: list[tuple[int, RunnerEvent]] = []
    await client.replay(
        nc, lambda env: found.append((env.seq, decode_event(env.data))) if env.subject == SUBJECT else None
    )
    return found


async def test_a_pair_is_two_consecutive_messages_in_order(nc: NATS) -> None:
    await streams.ensure_streams(nc.jetstream())
    writer = EventWriter(nc.jetstream(), "r1", 1, 0)
    first, second = await writer.write_pair(task_status(TaskStatus.RUNNING), runner_status(RunnerRunning()))
    assert second == first + 1 == writer.last_seq
    # The next write is fenced on the pair's second message, and another pair on that one.
    third, fourth = await writer.write_pair(runner_status(RunnerReady()), task_status(TaskStatus.COMPLETE))
    assert (third, fourth) == (second + 1, second + 2)
    events = await subject_events(nc)
    assert [seq for seq, _ in events] == [first, second, third, fourth]
    assert [type(e).__name__ for _, e in events] == [
        "TaskStatusUpdated",
        "RunnerStatusUpdated",
        "RunnerStatusUpdated",
        "TaskStatusUpdated",
    ]


async def test_a_pair_after_someone_else_wrote_our_subject_is_fenced_and_stores_nothing(nc: NATS) -> None:
    js = nc.jetstream()
    await streams.ensure_streams(js)
    writer = EventWriter(js, "r1", 1, 0)
    await writer.write(runner_status(RunnerReady()))
    twin = RunnerStatusUpdated(
        event_id="twin:1", runner_id="r1", incarnation=2, at=time.time(), runner_status=RunnerReady()
    )
    await client.publish(js, SUBJECT, twin, msg_id="twin:1", expected_last_subject_seq=writer.last_seq)
    with pytest.raises(Fenced) as fenced:
        await writer.write_pair(task_status(TaskStatus.RUNNING), runner_status(RunnerRunning()))
    assert not fenced.value.lost and fenced.value.incarnation == 2
    events = await subject_events(nc)
    assert [e.event_id for _, e in events] == ["r1:1:1", "twin:1"]


async def test_a_pair_whose_acks_are_lost_is_stored_once_and_the_writer_goes_on(nats_server: NatsServer) -> None:
    proxy = NatsProxy(nats_server.port)
    url = await proxy.start()
    nc = await client.connect(url, name="pair-writer")
    try:
        js = nc.jetstream()
        await streams.ensure_streams(js)
        writer = EventWriter(js, "r1", 1, 0)
        await writer.write(runner_status(RunnerReady()))
        # The pair's acks never reach the writer and its connection is cut: the server stored them.
        proxy.drop_next_ack()
        first, second = await writer.write_pair(task_status(TaskStatus.RUNNING), runner_status(RunnerRunning()))
        assert proxy.acks_dropped == 1 and proxy.connections >= 2
        assert second == first + 1 == writer.last_seq
        after = await writer.write(runner_status(RunnerReady()))
        events = await subject_events(nc)
        assert [e.event_id for _, e in events] == ["r1:1:1", "r1:1:2", "r1:1:3", "r1:1:4"]
        assert [seq for seq, _ in events][1:] == [first, second, after]
    finally:
        await nc.close()
