"""No request can take a runner away: prompts beyond the context window are refused at
once, and every task ends by its deadline, after which the runner serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TaskStatus, status_name
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.runner.deadlines import BadDeadline, Deadlines, Shares
from exojet.runner.shared_deadlines import SharedDeadlines
from testbed.log_watcher import LogWatcher
from tests.procs import stop
from tests.runner_harness import (
    DOWNLOAD,
    LOAD,
    SMALL_CONTEXT,
    WARMUP,
    RunnerHandle,
    chat,
    make_ready,
    ready_on_small_window,
    run_task,
    send,
    start_runner,
)

pytestmark = pytest.mark.timeout(180)


async def _ready_runner(
    url: str, models_dir: Path, watcher: LogWatcher, tmp_path: Path, nc: NATS, *args: str
) -> RunnerHandle:
    handle = await start_runner(url, models_dir, watcher, tmp_path, args=args)
    await make_ready(nc, watcher)
    return handle


def _statuses_after(watcher: LogWatcher, seq: int) -> list[str]:
    return [
        status_name(e.runner_status) for e in watcher.runner_events("r1", seq) if isinstance(e, RunnerStatusUpdated)
    ]


async def test_a_prompt_beyond_the_context_window_is_refused_at_once_and_the_runner_stays_ready(
    nats_server: NatsServer, models_dir: Path, watcher: LogWatcher, tmp_path: Path, nc: NATS
) -> None:
    handle = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    try:
        await ready_on_small_window(nc, watcher, models_dir)
        before = watcher.entries[-1][0].seq
        huge = {
            "type": "ChatCompletion",
            "task_id": "huge",
            "messages": [{"role": "user", "content": "lorem ipsum " * 75_000}],  # 900,000 characters
            "max_tokens": 16,
        }
        started = time.monotonic()
        done = await run_task(nc, watcher, huge, timeout=60)
        assert done.task_status == TaskStatus.FAILED and done.error_type == "ContextLengthExceeded", done
        assert f"context window of {SMALL_CONTEXT} tokens" in done.error_message
        assert time.monotonic() - started < 30
        too_long = await run_task(nc, watcher, {**chat(SMALL_CONTEXT), "task_id": "too-long"})
        assert too_long.error_type == "ContextLengthExceeded", too_long
        # Running, then straight back to Ready: no RunnerFailed, no engine restart.
        assert set(_statuses_after(watcher, before)) == {"RunnerRunning", "RunnerReady"}
        ok = await run_task(nc, watcher, {**chat(4), "task_id": "after"})
        assert ok.task_status == TaskStatus.COMPLETE, ok
    finally:
        stop(handle.proc)


async def test_a_chat_past_its_deadline_ends_timed_out_and_the_runner_serves_the_queue_behind_it(
    nats_server: NatsServer, models_dir: Path, watcher: LogWatcher, tmp_path: Path, nc: NATS
) -> None:
    handle = await _ready_runner(
        nats_server.url,
        models_dir,
        watcher,
        tmp_path,
        nc,
        "--deadline",
        "ChatCompletion=5",
        "--chat-seconds-per-token",
        "0.00001",
    )
    try:
        before = watcher.entries[-1][0].seq
        # 100,000 tokens get a deadline of 6 s: no machine generates them that fast, so
        # the long chat times out however quick this one is. Queued behind it far longer
        # than its own deadline, the short chat still completes: a deadline counts from
        # when the runner starts a task.
        await send(nc, "r1", {**chat(100_000), "task_id": "long"})
        await send(nc, "r1", {**chat(4), "task_id": "queued"})
        long = await watcher.task_done("long", 60)
        assert long.task_status == TaskStatus.TIMED_OUT and long.error_type == "DeadlineExceeded", long
        queued = await watcher.task_done("queued", 60)
        assert queued.task_status == TaskStatus.COMPLETE, queued
        assert "RunnerFailed" not in _statuses_after(watcher, before)
        assert _statuses_after(watcher, before)[-1] == "RunnerReady"
    finally:
        stop(handle.proc)


# 50 s of waiting for a real deadline: with the fault matrices (`-m slow`, run by .ci/run).
@pytest.mark.slow
async def test_a_stuck_engine_is_replaced_at_the_deadline_and_the_runner_serves_again(
    nats_server: NatsServer, models_dir: Path, watcher: LogWatcher, tmp_path: Path, nc: NATS
) -> None:
    handle = await _ready_runner(nats_server.url, models_dir, watcher, tmp_path, nc, "--deadline", "ChatCompletion=2")
    try:
        [engine] = psutil.Process(handle.proc.pid).children()
        before = watcher.entries[-1][0].seq
        await send(nc, "r1", {**chat(64), "task_id": "stuck"})
        await watcher.wait_for(lambda m: getattr(m, "task_id", None) == "stuck", timeout=30, after_seq=before)
        # A generation that never yields again (as a prefill that takes forever would).
        os.kill(engine.pid, signal.SIGSTOP)
        stuck = await watcher.task_done("stuck", 90)
        assert stuck.task_status == TaskStatus.TIMED_OUT and stuck.error_type == "DeadlineExceeded", stuck
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
        assert _statuses_after(watcher, before)[-1] == "RunnerFailed"
        # Usable again: the seed's steps from Failed bring it back to Ready, on a fresh engine.
        for i, task in enumerate((DOWNLOAD, LOAD, WARMUP, chat(4))):
            done = await run_task(nc, watcher, {**task, "task_id": f"again-{i}"})
            assert done.task_status == TaskStatus.COMPLETE, done
    finally:
        stop(handle.proc)


def test_deadlines_grow_with_a_chats_size_and_are_configurable_per_type() -> None:
    deadlines = Deadlines.parse(["LoadModel=5", "ChatCompletion=10"], chat_seconds_per_token=0.5)
    small = ChatCompletion(messages=[ChatMessage("user", "hi")], max_tokens=10)
    large = ChatCompletion(messages=[ChatMessage("user", "x" * 100_000)], max_tokens=1000)
    assert deadlines.for_task(small) < deadlines.for_task(large)
    assert deadlines.for_task(small) == pytest.approx(10 + 10 * 0.5 + 0.002 * 0.5)
    assert Deadlines.parse([]).by_type["DownloadModel"] > 3600
    for bad in ("LoadModel", "Nope=3", "LoadModel=-1", "LoadModel=soon"):
        with pytest.raises(BadDeadline):
            Deadlines.parse([bad])


def test_chats_side_by_side_share_the_engines_time() -> None:
    alone = Shares().sharing_now(1, wall=100.0)
    assert alone.at(110.0) == pytest.approx(110.0)
    # A second chat from 110 on: each is given half of every wall second.
    two = alone.sharing_now(2, wall=110.0)
    assert two.at(120.0) == pytest.approx(115.0)
    # A budget running out at virtual 130 is reached at wall 110 + 2 * 20.
    assert two.wall_when(130.0) == pytest.approx(150.0)
    # Back to one at wall 120 (virtual 115): 15 more wall seconds to 130.
    assert two.sharing_now(1, wall=120.0).wall_when(130.0) == pytest.approx(135.0)


async def test_a_chats_deadline_moves_while_another_shares_its_engine() -> None:
    deadlines = SharedDeadlines()
    budget = 0.3
    loop = asyncio.get_running_loop()
    beside = asyncio.Event()
    stop_beside = asyncio.Event()

    async def neighbour() -> None:
        async with deadlines.budget(60):
            beside.set()
            await stop_beside.wait()

    other = asyncio.create_task(neighbour())
    await asyncio.wait_for(beside.wait(), 5)
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.budget(budget) as timer:
            # Two chats share the engine: its 0.3 s take at least 0.6 s of wall time.
            assert timer.when() == pytest.approx(started + 2 * budget, abs=0.05)
            await asyncio.Event().wait()
    assert loop.time() - started >= 2 * budget - 0.01
    # The neighbour alone again: its own deadline is back in wall time.
    assert deadlines.sharing == 1
    [(timer, ends)] = deadlines.budgets.items()
    assert timer.when() == pytest.approx(deadlines.shares.wall_when(ends))
    stop_beside.set()
    await asyncio.wait_for(other, 5)
    assert deadlines.sharing == 0
