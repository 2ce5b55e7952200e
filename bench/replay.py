"""Replay benchmark: the supervisor's rebuild against a raw ordered-consumer drain.

Fills a fresh nats-server with realistic events (runners going through the seed's
workflow, then serving chats), then in the same run measures:
  - raw: nats-py's ordered consumer counting messages (the baseline),
  - read: the reader a rebuild uses (bus/nats/follower.py, through nats-py), counting,
  - rebuild: the supervisor's Projector folding the whole log (read + decode + apply),
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

from exojet.bus import streams  # noqa: E402
from exojet.bus.codec import encode  # noqa: E402
from exojet.bus.events import DownloadProgress, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated  # noqa: E402
from exojet.bus.nats import client, stream_setup  # noqa: E402
from exojet.bus.ops.server import NatsServer  # noqa: E402
from exojet.bus.statuses import (  # noqa: E402
    RunnerDownloading,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerWarmingUp,
    TaskStatus,
)
from exojet.bus.tasks import ChatCompletion, ChatMessage, DownloadModel, LoadModel, Shard, StartWarmup  # noqa: E402
from exojet.projections.apply import apply  # noqa: E402
from exojet.projections.state import ClusterState  # noqa: E402
from exojet.supervisor.projector import Projector  # noqa: E402

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
        return ev, encode(
            RunnerStatusUpdated(event_id=eid(), runner_id=runner_id, incarnation=1, runner_status=s, at=time.time())
        )

    def task(tid: str, st: TaskStatus, **kw: object) -> Message:
        return ev, encode(
            TaskStatusUpdated(
                event_id=eid(), runner_id=runner_id, incarnation=1, task_id=tid, task_status=st, at=time.time(), **kw
            )
        )

    shard = Shard(model_id="mlx-community/SmolLM2-135M-Instruct-4bit")
    yield ev, encode(RunnerRegistered(event_id=eid(), runner_id=runner_id, incarnation=1, host="bench", pid=1))
    yield status(RunnerIdle())
    yield tk, encode(DownloadModel(task_id=f"{runner_id}-d", shard=shard))
    yield task(f"{runner_id}-d", TaskStatus.RUNNING)
    yield status(RunnerDownloading())
    for i in range(1, 6):
        yield (
            ev,
            encode(
                DownloadProgress(
                    event_id=eid(),
                    runner_id=runner_id,
                    incarnation=1,
                    model_id=shard.model_id,
                    downloaded_bytes=i * 20_000_000,
                    total_bytes=100_000_000,
                    completed_files=i,
                    total_files=5,
                )
            ),
        )
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
        yield (
            tk,
            encode(
                ChatCompletion(
                    task_id=tid, messages=(ChatMessage("user", "What is the capital of France?"),), max_tokens=64
                )
            ),
        )
        yield task(tid, TaskStatus.RUNNING)
        yield status(RunnerRunning())
        yield status(RunnerReady())
        yield task(
            tid,
            TaskStatus.COMPLETE,
            result={
                "text": "The capital of France is Paris. " * 4,
                "finish_reason": "stop",
                "prompt_tokens": 31,
                "completion_tokens": 33,
            },
        )


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
        futures = [await js.publish_async(s, d) for s, d in messages[start : start + window]]
        await asyncio.gather(*futures)


async def raw_drain(js, total: int) -> float:
    """The baseline: nats-py's ordered consumer over the whole log, counting only."""
    count = 0
    done = asyncio.get_running_loop().create_future()

    async def on_msg(msg) -> None:
        nonlocal count
        count += 1
        if count == total:
            done.set_result(None)

    started = time.perf_counter()
    sub = await js.subscribe(
        ">",
        stream=streams.LOG_STREAM,
        cb=on_msg,
        ordered_consumer=True,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1024**3,
    )
    await asyncio.wait_for(done, 600)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return total / elapsed


async def reader_drain(nc, total: int) -> float:
    """The transport a rebuild uses (bus/nats/follower.py), counting only: the floor of a rebuild."""
    count = 0

    def on_env(env) -> None:
        nonlocal count
        count += 1

    started = time.perf_counter()
    await client.replay(nc, on_env, end_seq=total)
    assert count == total
    return total / (time.perf_counter() - started)


async def rebuild(nc, total: int) -> tuple[float, ClusterState]:
    projector = Projector(nc, snapshot_every=10**12)
    started = time.perf_counter()
    await projector.start()
    elapsed = time.perf_counter() - started
    await projector.stop()
    return total / elapsed, projector.state


async def main(events: int, repeat: int) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(port=0, monitor_port=0, store_dir=Path(tmp)).start()
        try:
            nc = await client.connect(server.url, name="bench")
            js = nc.jetstream()
            await stream_setup.ensure_streams(js)
            messages = realistic_log(events)
            started = time.perf_counter()
            await fill(js, messages)
            print(f"filled {len(messages)} messages in {time.perf_counter() - started:.1f} s")
            raw_rates, read_rates, rebuild_rates = [], [], []
            for _ in range(repeat):
                raw_rates.append(await raw_drain(js, len(messages)))
                read_rates.append(await reader_drain(nc, len(messages)))
                rate, state = await rebuild(nc, len(messages))
                rebuild_rates.append(rate)
            raw, read, full = (statistics.median(r) for r in (raw_rates, read_rates, rebuild_rates))
            print(f"raw nats-py ordered-consumer drain, counting: {raw:,.0f} msg/s (median of {repeat})")
            print(f"exojet's reader (the rebuild's transport), counting: {read:,.0f} msg/s")
            print(f"supervisor rebuild (read + decode + apply): {full:,.0f} msg/s")
            print(f"ratio rebuild/raw ordered consumer: {full / raw:.2f} (target >= 0.6)")
            print(f"ratio rebuild/exojet reader: {full / read:.2f} (what decode + apply cost on top of reading)")
            print(f"state: {len(state.runners)} runners, {len(state.tasks)} tasks, {len(state.anomalies)} anomalies")
            restart_times = await restart_from_snapshot(nc, messages, cut=int(len(messages) * 0.95), repeat=repeat)
            print(
                f"restart from a snapshot at {int(len(messages) * 0.95)}: "
                f"{statistics.median(restart_times) * 1000:.0f} ms (median of {repeat}; target < 500 ms)"
            )
            await nc.close()
        finally:
            server.stop()


async def restart_from_snapshot(nc, messages: list[Message], cut: int, repeat: int) -> list[float]:
    """Store a snapshot of the state at `cut`, then time Projector.start() from it."""
    from exojet.bus.envelope import Envelope
    from exojet.bus.nats.snapshot_store import store_snapshot
    from exojet.projections.snapshot import dump_snapshot

    state = ClusterState()
    for seq, (subject, data) in enumerate(messages[:cut], start=1):
        state = apply(state, Envelope(seq=seq, subject=subject, data=data))
    kv = await nc.jetstream().key_value(streams.SNAPSHOT_BUCKET)
    await store_snapshot(kv, dump_snapshot(state), state.seq, 1024 * 1024)
    times = []
    for _ in range(repeat):
        projector = Projector(nc, snapshot_every=10**12)
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
