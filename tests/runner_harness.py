"""Drive a real runner process through the bus in tests: start it, send tasks as `nats pub` does, wait for answers."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.events import RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.statuses import TaskStatus, status_name
from testbed.log_watcher import LogWatcher
from testbed.tiny_model import with_context
from tests.procs import exojet

TINY = "local/tiny"
PROMPT = "Tell me a long story"


class RunnerHandle:
    def __init__(self, proc: subprocess.Popen[bytes], runner_id: str, log: Path) -> None:
        self.proc, self.runner_id, self.log = proc, runner_id, log


async def start_runner(
    url: str,
    models_dir: Path,
    watcher: LogWatcher,
    tmp_path: Path,
    runner_id: str = "r1",
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> RunnerHandle:
    log = tmp_path / f"runner-{runner_id}-{len(watcher.entries)}.log"
    proc = exojet("runner", "--id", runner_id, "--nats", url, "--models-dir", str(models_dir), *args, log=log, env=env)
    await watcher.wait_for(
        lambda m: (
            isinstance(m, RunnerStatusUpdated)
            and m.runner_id == runner_id
            and status_name(m.runner_status) == "RunnerIdle"
        ),
        timeout=30,
        after_seq=watcher.entries[-1][0].seq if watcher.entries else 0,
    )
    return RunnerHandle(proc, runner_id, log)


async def send(nc: NATS, runner_id: str, task: dict | bytes) -> None:
    """What `nats pub exo.tasks.ID '...'` does: a core publish, no ack, no headers (flushed, as it exits)."""
    await nc.publish(subjects.task_subject(runner_id), task if isinstance(task, bytes) else msgspec.json.encode(task))
    await nc.flush()


async def exit_code(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Wait for the process without blocking the event loop (the test's NATS client runs on it)."""
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


async def run_task(
    nc: NATS, watcher: LogWatcher, task: dict, timeout: float = 60.0, runner_id: str = "r1"
) -> TaskStatusUpdated:
    """Send `task` (it needs a task_id) and wait for its terminal status."""
    await send(nc, runner_id, task)
    return await watcher.task_done(task["task_id"], timeout)


DOWNLOAD = {"type": "DownloadModel", "shard": {"model_id": TINY}}
LOAD = {"type": "LoadModel", "shard": {"model_id": TINY}}
WARMUP = {"type": "StartWarmup"}


def chat(max_tokens: int, **extra: object) -> dict:
    return {
        "type": "ChatCompletion",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        **extra,
    }


async def make_ready(nc: NATS, watcher: LogWatcher) -> None:
    for i, task in enumerate((DOWNLOAD, LOAD, WARMUP)):
        done = await run_task(nc, watcher, {**task, "task_id": f"ready-{i}"})
        assert done.task_status == TaskStatus.COMPLETE, done


# DESIGN.md's table, written out again so that a wrong table in the code shows.
ACCEPTED = {
    "DownloadModel": {"RunnerIdle", "RunnerConnected", "RunnerFailed"},
    "ConnectToGroup": {"RunnerIdle", "RunnerFailed"},
    "LoadModel": {"RunnerIdle", "RunnerConnected"},
    "StartWarmup": {"RunnerLoaded"},
    "ChatCompletion": {"RunnerReady"},
}
TASKS = {
    "DownloadModel": DOWNLOAD,
    "LoadModel": LOAD,
    "StartWarmup": WARMUP,
    "ChatCompletion": chat(4),
    "ConnectToGroup": {
        "type": "ConnectToGroup",
        "group": {"group_id": "g", "world_size": 2, "rank": 0, "hosts": ["127.0.0.1:1", "127.0.0.1:2"]},
    },
}


async def assert_refused_everywhere_else(
    nc: NATS, watcher: LogWatcher, status: str, tag: str, runner_id: str = "r1"
) -> None:
    """Every task DESIGN.md does not accept in `status` is refused (InvalidState) and changes nothing."""
    for kind, task in TASKS.items():
        if status in ACCEPTED[kind]:
            continue
        before = watcher.entries[-1][0].seq
        done = await run_task(nc, watcher, {**task, "task_id": f"{tag}-{kind}"}, runner_id=runner_id)
        assert done.task_status == TaskStatus.FAILED and done.error_type == "InvalidState", done
        assert status in done.error_message
        assert all(need in done.error_message for need in ACCEPTED[kind])
        # The runner's status did not move, and the refused task never ran.
        after = watcher.runner_events(runner_id, after_seq=before)
        assert [type(e).__name__ for e in after] == ["TaskStatusUpdated"], after


# The context window of the tiny llama `ready_on_small_window` loads.
SMALL_CONTEXT = 2048


async def ready_on_small_window(nc: NATS, watcher: LogWatcher, models_dir: Path) -> None:
    """Ready on the tiny llama with a 2,048-token context window (the default one has room for anything)."""
    with_context(models_dir / "local--tiny", models_dir / "local--tiny-2k", SMALL_CONTEXT)
    shard = {"shard": {"model_id": "local/tiny-2k"}}
    for i, task in enumerate(({**DOWNLOAD, **shard}, {**LOAD, **shard}, WARMUP)):
        done = await run_task(nc, watcher, {**task, "task_id": f"small-{i}"})
        assert done.task_status == TaskStatus.COMPLETE, done
