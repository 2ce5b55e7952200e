"""DESIGN.md's "Concurrent chats" on a real runner serving the tiny llama on llama.cpp (16 slots):
chats run side by side, the runner moves Ready -> Running once and back once, a refused chat
changes nothing for the others, and a task that is not a chat waits for them (an UnloadModel
gives them a grace period, then cancels them saying why)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from nats.aio.client import Client as NATS

from exojet.bus.events import RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TaskStatus, status_name
from exojet.runner.engine_llamacpp import MAX_CONTEXT, SLOTS
from testbed.log_watcher import LogWatcher
from tests.api_stack import API_KEY, MODEL, start_stack
from tests.gguf_tiny import as_gguf
from tests.procs import stop
from tests.runner_harness import chat, make_ready, run_task, send, start_runner

# Long enough that chats sent together overlap, short enough for a test.
LONG = 600


@pytest.fixture
def gguf_models_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """`local/tiny` with its GGUF beside the mlx-lm files (the runner is told to use llama.cpp)."""
    folder = tmp_path / "models" / "local--tiny"
    shutil.copytree(tiny_model_dir, folder)
    as_gguf(tiny_model_dir, folder / "model.gguf")
    return folder.parent


def _statuses(watcher: LogWatcher, after: int) -> list[str]:
    return [
        status_name(e.runner_status) for e in watcher.runner_events("r1", after) if isinstance(e, RunnerStatusUpdated)
    ]


def _task_events(watcher: LogWatcher, after: int) -> list[tuple[str, TaskStatus]]:
    return [(e.task_id, e.task_status) for e in watcher.runner_events("r1", after) if isinstance(e, TaskStatusUpdated)]


@pytest.mark.timeout(120)
async def test_chats_run_side_by_side_and_the_runner_moves_once_each_way(
    nats_server: NatsServer, gguf_models_dir: Path, tmp_path: Path, nc: NATS, watcher: LogWatcher
) -> None:
    runner = await start_runner(nats_server.url, gguf_models_dir, watcher, tmp_path, args=("--engine", "llamacpp"))
    try:
        await make_ready(nc, watcher)
        [load] = [m for _, m in watcher.entries if isinstance(m, TaskStatusUpdated) and m.task_id == "ready-1"][-1:]
        assert load.result is not None and load.result["engine"] == "llamacpp"
        assert load.result["chat_capacity"] == SLOTS
        assert load.result["capabilities"] == ["logit_bias", "logprobs", "n", "raw", "response_format", "tools"]
        before = watcher.entries[-1][0].seq

        ids = ["c0", "c1", "too-long", "c2", "c3"]
        for task_id in ids:
            max_tokens = MAX_CONTEXT + 1 if task_id == "too-long" else LONG
            await send(nc, "r1", {**chat(max_tokens), "task_id": task_id})
        done = {task_id: await watcher.task_done(task_id, 90) for task_id in ids}

        assert done["too-long"].task_status == TaskStatus.FAILED
        assert done["too-long"].error_type == "ContextLengthExceeded"
        texts = {done[t].result["text"] for t in ids if t != "too-long" and done[t].result}  # type: ignore[index]
        assert [done[t].task_status for t in ids if t != "too-long"] == [TaskStatus.COMPLETE] * 4
        assert len(texts) == 1  # the same greedy answer, served beside the others
        # One move each way for all of them, the refusal moving nothing.
        assert _statuses(watcher, before) == ["RunnerRunning", "RunnerReady"]
        events = _task_events(watcher, before)
        first_end = next(i for i, (t, s) in enumerate(events) if s == TaskStatus.COMPLETE)
        running = [t for t, s in events[:first_end] if s == TaskStatus.RUNNING]
        assert {"c0", "c1", "c2", "c3"} <= set(running)  # all four started before one ended
    finally:
        stop(runner.proc)


@pytest.mark.timeout(120)
async def test_an_unload_waits_its_grace_then_cancels_the_chats_saying_why(
    nats_server: NatsServer, gguf_models_dir: Path, tmp_path: Path, nc: NATS, watcher: LogWatcher
) -> None:
    args = ("--engine", "llamacpp", "--chat-grace", "0.3")
    runner = await start_runner(nats_server.url, gguf_models_dir, watcher, tmp_path, args=args)
    try:
        await make_ready(nc, watcher)
        endless = MAX_CONTEXT - 128
        for task_id in ("e0", "e1"):
            await send(nc, "r1", {**chat(endless), "task_id": task_id})
        await watcher.wait_for(lambda m: isinstance(m, TaskStatusUpdated) and m.task_id == "e1", 30)
        unload = asyncio.ensure_future(run_task(nc, watcher, {"type": "UnloadModel", "task_id": "u"}))

        ended = [await watcher.task_done(t, 60) for t in ("e0", "e1")]
        unloaded = await unload

        for chat_end in ended:
            assert chat_end.task_status == TaskStatus.CANCELLED, chat_end
            assert "UnloadModel" in (chat_end.error_message or "") and "0.3 s" in (chat_end.error_message or "")
        assert unloaded.task_status == TaskStatus.COMPLETE
        statuses = _statuses(watcher, 0)
        assert statuses[-2:] == ["RunnerReady", "RunnerIdle"]  # the chats ended before the unload ran
    finally:
        stop(runner.proc)


@pytest.mark.timeout(180)
def test_chats_through_the_api_run_at_once_and_metrics_show_the_load(tmp_path: Path, gguf_models_dir: Path) -> None:
    stack = start_stack(tmp_path, gguf_models_dir)
    try:
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)

        async def one(k: int) -> tuple[str, int]:
            stream = await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"story number {k}"}],
                max_tokens=LONG,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, tokens = "", 0
            async for part in stream:
                text += "".join(c.delta.content or "" for c in part.choices)
                tokens = part.usage.completion_tokens if part.usage else tokens
            return text, tokens

        async def chats() -> list[tuple[str, int]]:
            try:
                return await asyncio.gather(*(one(k) for k in range(6)))
            finally:
                await api.close()

        answers = asyncio.run(chats())

        assert all(text and tokens for text, tokens in answers), answers
        state = stack.cli("state")
        assert "0/16" in state  # chats busy of capacity, once they ended
        # What the runner, and so its instance, can do, in both tables.
        assert state.count("logit_bias, logprobs, n, raw, response_format, tools") == 2, state
        metrics = httpx.get(f"{stack.base_url[:-3]}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line and not line.startswith("#")
        }
        assert values['exojet_runner_chat_capacity{runner="r1"}'] == SLOTS
        assert values["exojet_first_token_seconds_count"] >= 6
        assert values['exojet_completion_tokens_total{runner="r1"}'] == sum(tokens for _, tokens in answers)
        # Chats started beside others: fewer than all 6 started on an idle runner.
        assert values['exojet_chat_batch_size_bucket{le="1.0"}'] < values["exojet_chat_batch_size_count"]
    finally:
        stack.close()
