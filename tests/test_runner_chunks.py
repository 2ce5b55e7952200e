"""Chunks the bus does not store fail the chat by name; the runner stays Ready."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import streams
from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.nats import stream_setup
from exojet.bus.statuses import TaskStatus, status_name
from testbed.log_watcher import LogWatcher
from tests.runner_harness import RunnerHandle, chat, make_ready, run_task

pytestmark = pytest.mark.timeout(60)


@pytest.mark.slow  # waits out client.ELECTION_S
@pytest.mark.timeout(120)  # the chunk publish is tried through client.ELECTION_S first
async def test_chunks_not_stored_fail_the_chat_and_the_runner_stays_ready(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    await make_ready(nc, watcher)
    js = nc.jetstream()
    await js.delete_stream(streams.CHUNKS_STREAM)
    before = watcher.entries[-1][0].seq
    done = await run_task(nc, watcher, {**chat(4), "task_id": "unstored"})
    assert done.task_status == TaskStatus.FAILED and done.error_type == "ChunksNotStored", done
    assert "EXO_CHUNKS" in done.error_message
    statuses = [
        status_name(e.runner_status) for e in watcher.runner_events("r1", before) if isinstance(e, RunnerStatusUpdated)
    ]
    assert statuses == ["RunnerRunning", "RunnerReady"]
    await stream_setup.ensure_streams(js)
    again = await run_task(nc, watcher, {**chat(4), "task_id": "stored"})
    assert again.task_status == TaskStatus.COMPLETE


async def test_a_chat_shows_no_text_before_its_running_statuses_are_stored(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    """DESIGN.md: the status is published before the work it names; a chat's first chunk is stored after it."""
    await make_ready(nc, watcher)
    before = watcher.entries[-1][0].seq
    done = await run_task(nc, watcher, {**chat(8), "task_id": "early"})
    assert done.task_status == TaskStatus.COMPLETE, done
    assert done.result is not None and 0 < done.result["engine_seconds"] < 60
    running = next(
        env.seq
        for env, event in watcher.entries
        if env.seq > before
        and isinstance(event, RunnerStatusUpdated)
        and status_name(event.runner_status) == "RunnerRunning"
    )
    js = nc.jetstream()
    stored = await js.get_msg(streams.LOG_STREAM, running)
    first_chunk = await js.get_msg(streams.CHUNKS_STREAM, (await js.stream_info(streams.CHUNKS_STREAM)).state.first_seq)
    assert first_chunk.data is not None and b'"index":0' in first_chunk.data and b'"early"' in first_chunk.data
    assert stored.time is not None and first_chunk.time is not None
    assert first_chunk.time >= stored.time
