"""Replay benchmark: the supervisor's rebuild against a raw ordered-consumer drain.

Fills a fresh nats-server with realistic events (runners going through the seed's
workflow, then serving chats), then in the same run measures:
  - raw: an ordered consumer that only counts messages (the floor),
  - rebuild: the supervisor's Projector folding the whole log (decode + apply),
  - restart: a Projector starting from a snapshot taken at 95% of the log.
Prints medians over --repeat runs and the rebuild/raw ratio.

    .venv/bin/python bench/replay.py [--events 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
from loguru import logger  # noqa: E402

from bus import client, streams  # noqa: E402
from bus.codec import encode  # noqa: E402
from bus.events import DownloadProgress, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated  # noqa: E402
from bus.server import NatsServer, free_port  # noqa: E402
from bus.statuses import (  # noqa: E402
    RunnerDownloading, RunnerIdle, RunnerLoaded, RunnerLoading, RunnerReady, RunnerRunning, RunnerWarmingUp,
    TaskStatus,
)
from bus.tasks import ChatCompletion, ChatMessage, DownloadModel, LoadModel, Shard, StartWarmup  # noqa: E402
from projections.apply import apply  # noqa: E402
from projections.state import ClusterState  # noqa: E402
from supervisor.projector import Projector  # noqa: E402

Message = tuple[str, bytes]


def runner_log(runner_id: str, chats: int) -> Iterator[Message]:
    """One runner's life: register, download (with progress), load, warm up, serve chats."""
    ev, tk = f"exo.events.runner.{runner_id}", f"exo.tasks.{runner_id}"
    n = 0

    def eid() -> str:
        nonlocal n
        n += 1
        return f"{runner_id}:1:{n}"

    def status(s: msgspec.Struct) -> Message:
        return ev, encode(RunnerStatusUpdated(event_id=eid(), runner_id=runner_id, incarnation=1, runner_status=s,
                                              at=time.time()))

    def task(tid: str, st: TaskStatus, **kw: object) -> Message:
        return ev, encode(TaskStatusUpdated(event_id=eid(), runner_id=runner_id, incarnation=1, task_id=tid,
                                            task_status=st, at=time.time(), **kw))

    shard = Shard(model_id="mlx-community/SmolLM2-135M-Instruct-4bit")
    yield ev, encode(RunnerRegistered(event_id=eid(), runner_id=runner_id, incarnation=1, host="bench", pid=1))
    yield status(RunnerIdle())
    yield tk, encode(DownloadModel(task_id=f"{runner_id}-d", shard=shard))
    yield task(f"{runner_id}-d", TaskStatus.RUNNING)
    yield status(RunnerDownloading())
    for i in range(1, 6):
        yield ev, encode(DownloadProgress(event_id=eid(), runner_id=runner_id, incarnation=1,
                                          model_id=shard.model_id, downloaded_bytes=i * 20_000_000,
                                          total_bytes=100_000_000, completed_files=i, total_files=5))
    yield status(RunnerIdle())
    yield task(f"{runner_id}-d", TaskStatus.COMPLETE)
    yield tk, encode(LoadModel(task_id=f"{runner_id}-l", shard=shard))
    yield task(f"{runner_id}-l", TaskStatus.RUNNING)
    yield status(RunnerLoading())
    yield status(RunnerLoaded())
    yield task(f"{runner_id}-l", TaskStatus.COMPLETE)
    yield tk, encode(StartWarmup(task_id=f"{runner_id}-w"))
    yield task(f"{runner_id}-w", TaskStatus.RUNNING)
    yield status(RunnerWarmingUp())
    yield status(RunnerReady())
    yield task(f"{runner_id}-w", TaskStatus.COMPLETE)
    for c in range(chats):
        tid = f"{runner_id}-c{c}"
        yield tk, encode(ChatCompletion(task_id=tid, messages=(ChatMessage("user", "What is the capital of France?"),),
                                        max_tokens=64))
        yield task(tid, TaskStatus.RUNNING)
        yield status(RunnerRunning())
        yield status(RunnerReady())
        yield task(tid, TaskStatus.COMPLETE, result={"text": "The capital of France is Paris. " * 4,
                                                     "finish_reason": "stop", "prompt_tokens": 31,
                                                     "completion_tokens": 33})


def realistic_log(total: int, runners: int = 50) -> list[Message]:
    """About `total` messages from `runners` runners, interleaved round-robin."""
    per_runner = total // runners
    chats = max(0, (per_runner - 21) // 5)
    lives = [list(runner_log(f"r{i}", chats)) for i in range(runners)]
    out: list[Message] = []
    for i in range(max(len(life) for life in lives)):
        out += [life[i] for life in lives if i < len(life)]
    return out[:total]


async def fill(js, messages: list[Message]) -> None:
    """Publish everything with acks pipelined (no fencing needed for a synthetic log)."""
    window = 2000
    for start in range(0, len(messages), window):
        futures = [await js.publish_async(s, d) for s, d in messages[start:start + window]]
        await asyncio.gather(*futures)


async def raw_drain(js) -> float:
    count = 0

    def on_env(env) -> None:
        nonlocal count
        count += 1

    started = time.perf_counter()
    await client.replay(js, on_env)
    return count / (time.perf_counter() - started)


async def rebuild(js, total: int) -> tuple[float, ClusterState]:
    projector = Projector(js, snapshot_every=10**12)
    started = time.perf_counter()
    await projector.start()
    elapsed = time.perf_counter() - started
    await projector.stop()
    return total / elapsed, projector.state


async def main(events: int, repeat: int) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(port=free_port(), monitor_port=free_port(), store_dir=Path(tmp)).start()
        try:
            nc = await client.connect(server.url, name="bench")
            js = nc.jetstream()
            await streams.ensure_streams(js)
            messages = realistic_log(events)
            started = time.perf_counter()
            await fill(js, messages)
            print(f"filled {len(messages)} messages in {time.perf_counter() - started:.1f} s")
            raw_rates, rebuild_rates = [], []
            for _ in range(repeat):
                raw_rates.append(await raw_drain(js))
                rate, state = await rebuild(js, len(messages))
                rebuild_rates.append(rate)
            raw, full = statistics.median(raw_rates), statistics.median(rebuild_rates)
            print(f"raw ordered-consumer drain: {raw:,.0f} msg/s (median of {repeat})")
            print(f"supervisor rebuild (decode + apply): {full:,.0f} msg/s (median of {repeat})")
            print(f"ratio rebuild/raw: {full / raw:.2f} (target >= 0.8)")
            print(f"state: {len(state.runners)} runners, {len(state.tasks)} tasks, {len(state.anomalies)} anomalies")
            restart_times = await restart_from_snapshot(js, messages, cut=int(len(messages) * 0.95), repeat=repeat)
            print(f"restart from a snapshot at {int(len(messages) * 0.95)}: "
                  f"{statistics.median(restart_times) * 1000:.0f} ms (median of {repeat}; target < 500 ms)")
            await nc.close()
        finally:
            server.stop()


async def restart_from_snapshot(js, messages: list[Message], cut: int, repeat: int) -> list[float]:
    """Store a snapshot of the state at `cut`, then time Projector.start() from it."""
    from bus.envelope import Envelope
    from projections.snapshot import dump_snapshot
    from supervisor.projector import SNAPSHOT_KEY

    state = ClusterState()
    for seq, (subject, data) in enumerate(messages[:cut], start=1):
        state = apply(state, Envelope(seq=seq, subject=subject, data=data))
    kv = await js.key_value(streams.SNAPSHOT_BUCKET)
    await kv.put(SNAPSHOT_KEY, dump_snapshot(state))
    times = []
    for _ in range(repeat):
        projector = Projector(js, snapshot_every=10**12)
        started = time.perf_counter()
        await projector.start()
        times.append(time.perf_counter() - started)
        assert projector.state.seq == len(messages)
        await projector.stop()
    return times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.repeat))
