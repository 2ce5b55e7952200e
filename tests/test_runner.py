"""The runner process against a real nats-server, on the tiny llama, through the bus."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from exojet.bus import subjects
from exojet.bus.events import LoadProgress, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TaskStatus, status_name
from exojet.bus.streams import CHUNKS_STREAM
from testbed import REPO
from testbed.log_watcher import LogWatcher
from tests.procs import stop
from tests.runner_harness import (
    DOWNLOAD,
    LOAD,
    PROMPT,
    WARMUP,
    RunnerHandle,
    assert_refused_everywhere_else,
    chat,
    exit_code,
    make_ready,
    run_task,
    send,
    start_runner,
)

pytestmark = pytest.mark.timeout(120)


def direct_generation(model_dir: Path, max_tokens: int) -> str:
    """mlx_lm run directly on the same model and prompt (greedy), in a clean process."""
    code = (
        "import sys, mlx_lm\n"
        "m, t = mlx_lm.load(sys.argv[1])\n"
        "p = t.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], add_generation_prompt=True)\n"
        "sys.stdout.write(mlx_lm.generate(m, t, p, max_tokens=int(sys.argv[3])).encode('unicode_escape').decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), PROMPT, str(max_tokens)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.encode().decode("unicode_escape")


async def chunks_of(nc: NATS, stream_id: str) -> str:
    """All chunk texts of a finished generation, replayed from EXO_CHUNKS."""
    js = nc.jetstream()
    sub = await js.subscribe(
        subjects.chunks_filter(stream_id),
        stream=CHUNKS_STREAM,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    text, index = "", 0
    while True:
        msg = await sub.next_msg(timeout=10)
        chunk = msgspec.json.decode(msg.data)
        assert chunk["index"] == index
        index += 1
        if chunk.get("done"):
            await sub.unsubscribe()
            return text
        text += chunk["text"]


async def test_seed_workflow_through_the_bus(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle, models_dir: Path
) -> None:
    # As a user types them: no task ids, so each task's id is its stream sequence.
    for task in (DOWNLOAD, LOAD, WARMUP, chat(24)):
        await send(nc, "r1", task)
    _, done = await watcher.wait_for(
        lambda m: (
            isinstance(m, TaskStatusUpdated)
            and m.task_type == "ChatCompletion"
            and m.task_status == TaskStatus.COMPLETE
        ),
        timeout=60,
    )
    events = watcher.runner_events("r1")
    story = [
        (type(e).__name__, status_name(e.runner_status))
        if isinstance(e, RunnerStatusUpdated)
        else (e.task_type, str(e.task_status))
        if isinstance(e, TaskStatusUpdated)
        else (type(e).__name__, "")
        for e in events
    ]
    # The load reports its layers while the runner is Loading: the first and the last at least.
    loading = [s[0] for s in story[story.index(("RunnerStatusUpdated", "RunnerLoading")) :]]
    loads = [e for e in events if isinstance(e, LoadProgress)]
    assert loading[1 : 1 + len(loads)] == ["LoadProgress"] * len(loads)
    assert (loads[0].layers_loaded, loads[-1].layers_loaded, loads[-1].layers_total) == (1, 4, 4)
    load_id = next(e.task_id for e in events if isinstance(e, TaskStatusUpdated) and e.task_type == "LoadModel")
    assert {(e.model_id, e.task_id) for e in loads} == {("local/tiny", load_id)}
    assert [s for s in story if s[0] not in ("DownloadProgress", "LoadProgress")] == [
        ("RunnerRegistered", ""),
        ("RunnerStatusUpdated", "RunnerIdle"),
        ("DownloadModel", "Running"),
        ("RunnerStatusUpdated", "RunnerDownloading"),
        ("RunnerStatusUpdated", "RunnerIdle"),
        ("DownloadModel", "Complete"),
        ("LoadModel", "Running"),
        ("RunnerStatusUpdated", "RunnerLoading"),
        ("RunnerStatusUpdated", "RunnerLoaded"),
        ("LoadModel", "Complete"),
        ("StartWarmup", "Running"),
        ("RunnerStatusUpdated", "RunnerWarmingUp"),
        ("RunnerStatusUpdated", "RunnerReady"),
        ("StartWarmup", "Complete"),
        ("ChatCompletion", "Running"),
        ("RunnerStatusUpdated", "RunnerRunning"),
        ("RunnerStatusUpdated", "RunnerReady"),
        ("ChatCompletion", "Complete"),
    ]
    chat_seq = next(
        env.seq for env, m in watcher.entries if env.subject == "exo.tasks.r1" and type(m).__name__ == "ChatCompletion"
    )
    assert done.task_id == str(chat_seq)
    streamed = await chunks_of(nc, done.task_id)
    assert streamed == done.result["text"]
    assert streamed == direct_generation(models_dir / "local--tiny", 24)
    assert done.result["finish_reason"] == "length" and done.result["completion_tokens"] == 24


async def test_every_invalid_state_pair(nc: NATS, watcher: LogWatcher, runner: RunnerHandle, models_dir: Path) -> None:
    await assert_refused_everywhere_else(nc, watcher, "RunnerIdle", "idle")
    for i, task in enumerate((DOWNLOAD, LOAD)):
        assert (await run_task(nc, watcher, {**task, "task_id": f"l{i}"})).task_status == TaskStatus.COMPLETE
    await assert_refused_everywhere_else(nc, watcher, "RunnerLoaded", "loaded")
    assert (await run_task(nc, watcher, {**WARMUP, "task_id": "w"})).task_status == TaskStatus.COMPLETE
    await assert_refused_everywhere_else(nc, watcher, "RunnerReady", "ready")
    # A model folder whose weights are garbage: the engine fails, the runner is Failed.
    broken = models_dir / "local--broken"
    broken.mkdir()
    for f in (models_dir / "local--tiny").iterdir():
        (broken / f.name).write_bytes(f.read_bytes() if f.suffix != ".safetensors" else b"not weights")
    assert (await run_task(nc, watcher, {"type": "UnloadModel", "task_id": "u"})).task_status == TaskStatus.COMPLETE
    failed = await run_task(nc, watcher, {"type": "LoadModel", "task_id": "bad", "shard": {"model_id": "local/broken"}})
    assert failed.task_status == TaskStatus.FAILED and "could not load model" in failed.error_message
    _, status = await watcher.status("r1", "RunnerFailed")
    assert "could not load model" in status.runner_status.error_message
    await assert_refused_everywhere_else(nc, watcher, "RunnerFailed", "failed")
    # Failed -> DownloadModel -> Idle: usable again.
    assert (await run_task(nc, watcher, {**DOWNLOAD, "task_id": "again"})).task_status == TaskStatus.COMPLETE
    assert status_name(watcher.runner_events("r1")[-2].runner_status) == "RunnerIdle"


async def test_load_before_download_names_the_fix(nc: NATS, watcher: LogWatcher, runner: RunnerHandle) -> None:
    before = watcher.entries[-1][0].seq
    done = await run_task(
        nc, watcher, {"type": "LoadModel", "task_id": "early", "shard": {"model_id": "someone/elsewhere"}}
    )
    assert done.error_type == "ModelNotDownloaded"
    assert done.error_message == ("model someone/elsewhere is not downloaded on runner r1: send DownloadModel first")
    assert [type(e).__name__ for e in watcher.runner_events("r1", before)] == ["TaskStatusUpdated"]


async def test_bad_input_is_named_and_the_runner_keeps_going(
    nc: NATS, watcher: LogWatcher, runner: RunnerHandle
) -> None:
    bad = [
        (b"this is not json", "NotJson"),
        (b'{"type":"Teleport"}', "UnknownType"),
        (b'{"type":"ChatCompletion","messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}', "InvalidField"),
        (b'{"type":"DownloadModel"}', "MissingField"),
        (b'{"type":"DownloadModel","shard":{"model_id":"../../etc"}}', "InvalidModelId"),
        (b'{"type":"StartWarmup","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}', "PayloadTooLarge"),
    ]
    for data, _ in bad:
        await send(nc, "r1", data)
    answers = []
    for _data, error_type in bad:
        _, event = await watcher.wait_for(
            lambda m, et=error_type: isinstance(m, TaskStatusUpdated) and m.error_type == et, timeout=30
        )
        answers.append(event)
    task_seqs = [env.seq for env, _ in watcher.entries if env.subject == "exo.tasks.r1"]
    assert sorted(int(a.task_id) for a in answers) == task_seqs
    assert all(a.task_status == TaskStatus.FAILED for a in answers)
    assert runner.proc.poll() is None
    done = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "after"})
    assert done.task_status == TaskStatus.COMPLETE


async def test_engine_killed_during_generation(nc: NATS, watcher: LogWatcher, runner: RunnerHandle) -> None:
    await make_ready(nc, watcher)
    await send(nc, "r1", {**chat(50_000), "task_id": "long"})
    # Wait for the first chunk: generation is under way in the engine child.
    js = nc.jetstream()
    sub = await js.subscribe(
        subjects.chunks_filter("long"),
        stream=CHUNKS_STREAM,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )
    await sub.next_msg(timeout=30)
    engines = psutil.Process(runner.proc.pid).children()
    assert len(engines) == 1
    os.kill(engines[0].pid, signal.SIGKILL)
    done = await watcher.task_done("long", timeout=30)
    assert done.task_status == TaskStatus.FAILED and done.error_type == "EngineCrashed"
    assert "SIGKILL" in done.error_message
    _, failed = await watcher.status("r1", "RunnerFailed")
    assert "SIGKILL" in failed.runner_status.error_message
    await sub.unsubscribe()
    # The runner lives on: Failed -> DownloadModel -> Idle -> Load -> Warmup -> Ready, new engine.
    for i, task in enumerate((DOWNLOAD, LOAD, WARMUP)):
        assert (await run_task(nc, watcher, {**task, "task_id": f"back-{i}"})).task_status == TaskStatus.COMPLETE
    assert (await run_task(nc, watcher, {**chat(8), "task_id": "works"})).task_status == TaskStatus.COMPLETE
    assert psutil.Process(runner.proc.pid).children()[0].pid != engines[0].pid


async def collect_heartbeats(nc: NATS, runner_id: str) -> tuple[list[dict], Subscription]:
    beats: list[dict] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(msgspec.json.decode(msg.data))

    return beats, await nc.subscribe(subjects.heartbeat_subject(runner_id), cb=on_beat)


async def test_heartbeats_keep_coming_while_generating(nc: NATS, watcher: LogWatcher, runner: RunnerHandle) -> None:
    await make_ready(nc, watcher)
    beats, hb = await collect_heartbeats(nc, "r1")
    await send(nc, "r1", {**chat(2500), "task_id": "busy"})
    _, running = await watcher.wait_for(lambda m: isinstance(m, TaskStatusUpdated) and m.task_id == "busy")
    done = await watcher.task_done("busy", timeout=60)
    await hb.unsubscribe()
    took = done.at - running.at
    during = [b for b in beats if running.at <= b["at"] <= done.at]
    assert took > 1.5, "the generation must last long enough to see beats"
    # One beat a second, never blocked by generation (which runs in the engine child).
    assert len(during) >= int(took) - 1
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(during)]
    assert max(gaps) < 2.0


async def test_restarted_runner_does_not_rerun_finished_tasks(
    nats_server: NatsServer,
    nc: NATS,
    watcher: LogWatcher,
    models_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    first = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    request.addfinalizer(lambda: stop(first.proc))
    for i, task in enumerate((DOWNLOAD, LOAD)):
        assert (await run_task(nc, watcher, {**task, "task_id": f"t{i}"})).task_status == TaskStatus.COMPLETE
    await send(nc, "r1", {"type": "Shutdown", "task_id": "bye"})
    assert await exit_code(first.proc) == 0
    # Losing the consumer (an operator deleting it, say) redelivers every task ever sent.
    await nc.jetstream().delete_consumer("EXO_LOG", "runner-r1")
    restart_seq = watcher.entries[-1][0].seq
    second = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    try:
        done = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "fresh"})
        assert done.task_status == TaskStatus.COMPLETE
        again = [e.task_id for e in watcher.runner_events("r1", restart_seq) if isinstance(e, TaskStatusUpdated)]
        assert again == ["fresh", "fresh"]
    finally:
        stop(second.proc)


async def test_two_runners_one_id(
    nats_server: NatsServer, nc: NATS, watcher: LogWatcher, runner: RunnerHandle, models_dir: Path
) -> None:
    twin = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exojet.cli.main",
        "runner",
        "--id",
        "r1",
        "--nats",
        nats_server.url,
        "--models-dir",
        str(models_dir),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(twin.communicate(), 60)
    assert twin.returncode == 1
    assert "runner r1 is already running (incarnation 1)" in stderr.decode()
    registrations = [e for e in watcher.runner_events("r1") if isinstance(e, RunnerRegistered)]
    assert len(registrations) == 1 and runner.proc.poll() is None


async def test_shutdown_exits_zero(nc: NATS, watcher: LogWatcher, runner: RunnerHandle) -> None:
    await make_ready(nc, watcher)
    await send(nc, "r1", {"type": "Shutdown", "task_id": "bye"})
    assert await exit_code(runner.proc) == 0
    tail = watcher.runner_events("r1")[-4:]
    assert [type(e).__name__ for e in tail] == [
        "TaskStatusUpdated",
        "RunnerStatusUpdated",
        "TaskStatusUpdated",
        "RunnerStatusUpdated",
    ]
    assert status_name(tail[1].runner_status) == "RunnerShuttingDown"
    assert tail[2].task_status == TaskStatus.COMPLETE
    assert status_name(tail[3].runner_status) == "RunnerShutdown"


async def test_download_through_a_hub_with_progress(
    nats_server: NatsServer,
    nc: NATS,
    watcher: LogWatcher,
    tiny_model_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    from tests.hf_endpoint import HFEndpoint

    with HFEndpoint() as hub:
        hub.add_repo("org/tiny", tiny_model_dir)
        hub.slow("org/tiny", "model.safetensors", chunk_delay=0.05)
        models = tmp_path / "empty-models"
        handle = await start_runner(
            nats_server.url, models, watcher, tmp_path, env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        )
        request.addfinalizer(lambda: stop(handle.proc))
        done = await run_task(
            nc, watcher, {"type": "DownloadModel", "task_id": "dl", "shard": {"model_id": "org/tiny"}}, timeout=90
        )
        assert done.task_status == TaskStatus.COMPLETE, done
        progress = [e for e in watcher.runner_events("r1") if type(e).__name__ == "DownloadProgress"]
        assert len(progress) >= 2
        assert [p.downloaded_bytes for p in progress] == sorted(p.downloaded_bytes for p in progress)
        assert progress[-1].downloaded_bytes == progress[-1].total_bytes > 0
        # What placement needs, reported so no supervisor needs the files: layers and bytes on disk.
        assert done.result is not None
        assert done.result["n_layers"] == json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
        assert done.result["size_bytes"] == sum(
            f.stat().st_size for f in (models / "org--tiny").rglob("*") if f.is_file()
        )
        assert (models / "org--tiny" / "model.safetensors").read_bytes() == (
            tiny_model_dir / "model.safetensors"
        ).read_bytes()
        missing = await run_task(
            nc, watcher, {"type": "DownloadModel", "task_id": "404", "shard": {"model_id": "org/missing"}}
        )
        assert missing.error_type == "ModelNotFound" and "org/missing" in missing.error_message


async def test_runner_killed_mid_task_answers_it_on_restart(
    nats_server: NatsServer,
    nc: NATS,
    watcher: LogWatcher,
    models_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    first = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    request.addfinalizer(lambda: stop(first.proc))
    await make_ready(nc, watcher)
    await send(nc, "r1", {**chat(50_000), "task_id": "doomed"})
    await watcher.wait_for(lambda m: isinstance(m, TaskStatusUpdated) and m.task_id == "doomed")
    first.proc.kill()
    assert await exit_code(first.proc) == -signal.SIGKILL
    second = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    request.addfinalizer(lambda: stop(second.proc))
    done = await watcher.task_done("doomed", timeout=30)
    assert done.task_status == TaskStatus.FAILED and done.error_type == "RunnerRestarted"
    assert done.incarnation == 2 and "incarnation 2" in done.error_message
    # The redelivered message is recognised as answered; the next task runs within the ack wait.
    fresh = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "next"}, timeout=20)
    assert fresh.task_status == TaskStatus.COMPLETE
    doomed_answers = [
        e for e in watcher.runner_events("r1") if isinstance(e, TaskStatusUpdated) and e.task_id == "doomed"
    ]
    assert [str(e.task_status) for e in doomed_answers] == ["Running", "Failed"]
