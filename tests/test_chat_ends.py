"""`exojet chat` ends within seconds, naming why, however its chat ends: its task cancelled, its
instance deleted, its runner killed (lost) or silent, refused (queue full), no supervisor to route
it (the reader is `bus/nats/chat_session.py`, the API's too)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.cancel import CancelTask
from exojet.bus.chat_ends import ChatLost
from exojet.bus.nats import client
from exojet.bus.nats.chat_session import ChatSession
from exojet.bus.nats.query_client import query
from exojet.bus.ops.server import NatsServer
from exojet.bus.views import TaskView
from tests.api_stack import MODEL, ApiStack
from tests.procs import REPO

pytestmark = pytest.mark.timeout(240)

LIVENESS_S = 2.0
# Past the cause: the watchdog's tick, a process's exit, a loaded machine.
SLACK_S = 10.0


@pytest.fixture
def single(tmp_path: Path, models_dir: Path) -> Iterator[ApiStack]:
    """The tiny model Ready on r1 (its heartbeats timed out after 2 s)."""
    s = ApiStack(tmp_path, models_dir, heartbeat_timeout=LIVENESS_S)
    try:
        s.place("--runners", "r1")
        yield s
    finally:
        s.close()


@pytest.fixture
def pipeline(tmp_path: Path, models_dir: Path) -> Iterator[ApiStack]:
    """The tiny model Ready over r1 and r2 (a pipeline serves one chat at a time), no chat may wait."""
    s = ApiStack(tmp_path, models_dir, runners=("r1", "r2"), max_queue=0)
    try:
        s.place("--runners", "r1,r2", "--min-runners", "2")
        yield s
    finally:
        s.close()


async def _long_chat(url: str, *args: str) -> asyncio.subprocess.Process:
    """`exojet chat` of a long answer, once its first text is out (generation is under way)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exojet.cli.main",
        "chat",
        "Tell me a long story",
        "--max-tokens",
        "16000",
        *args,
        "--nats",
        url,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.read(1), 90), "the chat printed nothing"
    return proc


async def _ended(proc: asyncio.subprocess.Process, within: float) -> str:
    """The chat's error, once it exited 1 within `within` seconds."""
    _, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode == 1, err
    return err.decode()


async def _running_chat(nc: NATS) -> TaskView:
    async with asyncio.timeout(30):
        while True:
            reply = await query(nc, "state", sections=["tasks"])
            chats = [t for t in reply.tasks.values() if t.task_type == "ChatCompletion"]
            running = [t for t in chats if t.status == "Running"]
            if running:
                return running[0]
            await asyncio.sleep(0.1)  # poll interval while the supervisor folds the Running status


async def test_a_cancelled_then_a_deleted_then_a_killed_runners_chat_each_end_naming_why(single: ApiStack) -> None:
    nc = await client.connect(single.url, name="test")
    try:
        chat = await _long_chat(single.url)
        task = await _running_chat(nc)
        await client.publish(
            nc.jetstream(),
            subjects.cancel_subject(task.runner_id),
            CancelTask(task_id=task.task_id, reason="the test cancels it"),
        )
        assert "Cancelled" in await _ended(chat, SLACK_S)

        chat = await _long_chat(single.url)
        instance_id = (await query(nc, "state", sections=["instances"], instance_status="Ready")).instances
        [instance_id] = list(instance_id)
        single.cli("delete", instance_id)
        assert f"instance {instance_id} was deleted" in await _ended(chat, SLACK_S)

        single.place("--runners", "r1")
        chat = await _long_chat(single.url)
        single.procs["r1"].kill()
        killed = time.monotonic()
        err = await _ended(chat, LIVENESS_S + SLACK_S)
        assert "runner r1" in err and ("was lost" in err or "no heartbeat" in err), err
        assert time.monotonic() - killed < LIVENESS_S + SLACK_S
    finally:
        await nc.close()


async def test_a_chat_past_a_full_queue_is_refused_at_once(pipeline: ApiStack) -> None:
    first = await _long_chat(pipeline.url)
    started = time.monotonic()
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exojet.cli.main", "chat", "hi", "--model", MODEL, "--nats", pipeline.url,
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    err = await _ended(second, SLACK_S)
    assert "QueueFull" in err and MODEL in err, err
    assert time.monotonic() - started < SLACK_S
    first.kill()
    await first.communicate()


async def test_a_chat_no_supervisor_routes_ends_naming_it(nats_server: NatsServer) -> None:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exojet.cli.main",
        "chat",
        "hi",
        "--timeout",
        "3",
        "--nats",
        nats_server.url,
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    err = await _ended(proc, 3 + SLACK_S)
    assert "NoSupervisor" in err and "exojet supervisor" in err, err
    assert time.monotonic() - started < 3 + SLACK_S


async def test_a_chat_whose_runner_falls_silent_ends_after_the_liveness_timeout(nc: NATS) -> None:
    # A runner that took the chat and then sent nothing: no heartbeat, no status.
    session = ChatSession(nc, liveness_timeout=1.0)
    await session.start()
    try:
        stream = await session.follow_task("mute", "chat-mute", "chat-mute", ready=True)
        started = time.monotonic()
        with pytest.raises(ChatLost, match="runner mute sent no heartbeat"):
            async with asyncio.timeout(10):
                async for _ in session.answer(stream):
                    pass
        assert time.monotonic() - started < 1.0 + SLACK_S
    finally:
        await session.stop()
