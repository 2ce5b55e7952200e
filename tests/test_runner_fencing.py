"""Fencing of a live runner: a RunnerLost written over it, and a twin writing its subject."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from exojet.bus import subjects
from exojet.bus.events import (
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.nats import client
from exojet.bus.statuses import RunnerIdle, TaskStatus, status_name
from exojet.bus.streams import CHUNKS_STREAM
from testbed.log_watcher import LogWatcher
from tests.runner_harness import (
    DOWNLOAD,
    RunnerHandle,
    chat,
    exit_code,
    make_ready,
    run_task,
    send,
)

pytestmark = pytest.mark.timeout(60)


async def declare_lost(nc: NATS, watcher: LogWatcher) -> int:
    """Write RunnerLost on r1's subject as a supervisor does: fenced on the runner's last write."""
    js = nc.jetstream()
    subject = subjects.runner_events_subject("r1")
    last = await client.last_on_subject(js, subject)
    assert last is not None
    ack = await client.publish(
        js,
        subject,
        RunnerLost(
            event_id="lost-r1-1",
            runner_id="r1",
            incarnation=1,
            at=time.time(),
            reason="test: no heartbeat",
            supervisor_id="test",
        ),
        msg_id="lost-r1-1",
        expected_last_subject_seq=last.seq,
    )
    await watcher.wait_for(lambda m: isinstance(m, RunnerLost), timeout=10)
    return ack.seq


def story(events: list[object]) -> list[str]:
    """Each event as `Type` / `Type:status` / `task_id:status`, to compare orders."""
    out = []
    for e in events:
        if isinstance(e, RunnerStatusUpdated):
            out.append(status_name(e.runner_status))
        elif isinstance(e, TaskStatusUpdated):
            out.append(f"{e.task_id}:{e.task_status}")
        elif isinstance(e, RunnerRegistered):
            out.append(f"RunnerRegistered:{e.incarnation}")
        else:
            out.append(type(e).__name__)
    return out


async def test_idle_runner_declared_lost_comes_back_on_its_own(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    lost_seq = await declare_lost(nc, watcher)
    # No task needed: it sees the loss on its own subject and registers incarnation 2.
    await watcher.wait_for(lambda m: isinstance(m, RunnerStatusUpdated) and m.incarnation == 2, timeout=10)
    assert story(watcher.runner_events("r1", lost_seq)) == ["RunnerRegistered:2", "RunnerIdle"]
    done = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "after-loss"})
    assert done.task_status == TaskStatus.COMPLETE and done.incarnation == 2
    assert runner.proc.poll() is None


async def test_runner_declared_lost_mid_chat_does_not_answer_the_chat_again(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    await make_ready(nc, watcher)
    js = nc.jetstream()
    sub = await js.subscribe(
        subjects.chunks_filter("mid"),
        stream=CHUNKS_STREAM,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    await send(nc, "r1", {**chat(1000), "task_id": "mid"})
    # Once a chunk is out, the runner writes nothing until the chat ends: the loss lands mid-chat.
    await sub.next_msg(timeout=30)
    await sub.unsubscribe()
    lost_seq = await declare_lost(nc, watcher)
    _, registered = await watcher.wait_for(lambda m: isinstance(m, RunnerRegistered) and m.incarnation == 2, timeout=30)
    # The loss failed the chat in the cluster's view; the new incarnation holds
    # nothing (Idle) and writes no second terminal status for it.
    next_task = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "next"})
    assert next_task.task_status == TaskStatus.COMPLETE
    after = [e for e in watcher.runner_events("r1", lost_seq) if type(e).__name__ != "DownloadProgress"]
    assert story(after) == [
        "RunnerRegistered:2",
        "RunnerIdle",
        "next:Running",
        "RunnerDownloading",
        "RunnerIdle",
        "next:Complete",
    ]
    assert registered.pid == runner.proc.pid
    # The loss did land mid-chat: the chat's only status in the log is Running.
    mid = [
        str(e.task_status)
        for e in watcher.runner_events("r1")
        if isinstance(e, TaskStatusUpdated) and e.task_id == "mid"
    ]
    assert mid == ["Running"]


async def test_a_twin_write_during_the_run_stops_the_runner(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    js = nc.jetstream()
    subject = subjects.runner_events_subject("r1")
    last = await client.last_on_subject(js, subject)
    assert last is not None
    # Another process holding id r1 wrote in between (fenced correctly on its side).
    await client.publish(
        js,
        subject,
        RunnerStatusUpdated(
            event_id="twin-1", runner_id="r1", incarnation=1, at=time.time(), runner_status=RunnerIdle()
        ),
        msg_id="twin-1",
        expected_last_subject_seq=last.seq,
    )
    await send(nc, "r1", {**DOWNLOAD, "task_id": "refused"})
    assert await exit_code(runner.proc) == 1
    answers = [e for e in watcher.runner_events("r1", last.seq) if isinstance(e, TaskStatusUpdated)]
    assert answers == []
    log = runner.log.read_text()
    assert "runner r1 is already running (incarnation 1)" in log
