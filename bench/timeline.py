"""Timeline benchmark: `/timeline/{seq}` on a long log (api/timeline_index.py).

Fills a fresh nats-server with bench/replay.py's realistic log and stores the supervisor's
snapshot halfway, so the page's fold starts from it and folds the half before in the
background; then, warm, asks for the state at random seqs one request at a time (what the
route does: the index's state_at and the body's JSON) and prints:
  - how long the page's fold took to start, and the history fold to finish,
  - the checkpoints' size (each shared segment once) and the process's peak RSS,
  - the latency p50 / p90 / p99 / max of a request (target: p99 < 50 ms at 1,000,000 events),
    and the load average (the machine may be shared).

    .venv/bin/python bench/timeline.py [--events 1000000] [--requests 300] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
from loguru import logger  # noqa: E402

from bench.replay import fill, realistic_log  # noqa: E402
from exojet.api.live import LiveCluster  # noqa: E402
from exojet.bus.envelope import Envelope  # noqa: E402
from exojet.bus.nats import client, stream_setup  # noqa: E402
from exojet.bus.nats.snapshot_store import store_snapshot  # noqa: E402
from exojet.bus.ops.server import NatsServer  # noqa: E402
from exojet.bus.streams import SNAPSHOT_BUCKET  # noqa: E402
from exojet.projections.apply import apply  # noqa: E402
from exojet.projections.snapshot import dump_snapshot  # noqa: E402
from exojet.projections.state import ClusterState  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _snapshot_at(nc, cut: int) -> None:
    """The supervisor's snapshot of the log's first `cut` messages, stored as it stores one."""
    state = ClusterState()

    def on_env(env: Envelope) -> None:
        nonlocal state
        state = apply(state, env)

    await client.replay(nc, on_env, end_seq=cut)
    kv = await nc.jetstream().key_value(SNAPSHOT_BUCKET)
    await store_snapshot(kv, dump_snapshot(state), state.seq, 1024 * 1024)


async def main(events: int, requests: int, store: Path | None) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(port=0, monitor_port=0, store_dir=store or Path(tmp)).start()
        try:
            nc = await client.connect(server.url, name="bench")
            await stream_setup.ensure_streams(nc.jetstream())
            if filled := await client.last_seq(nc.jetstream()):
                events = filled
                print(f"a store filled before: {events} messages")
            else:
                started = time.perf_counter()
                messages = realistic_log(events)
                events = len(messages)
                await fill(nc.jetstream(), messages)
                del messages
                print(f"filled {events} messages in {time.perf_counter() - started:.1f} s")
                await _snapshot_at(nc, events // 2)
            rss_before = _rss_mb()
            live = LiveCluster(server.url)
            started = time.perf_counter()
            await live.ready()
            took = time.perf_counter() - started
            print(f"page's fold started from the snapshot at {live.timeline.live_from} in {took:.1f} s")
            assert live._history is not None
            await live._history
            print(f"history before the snapshot folded (with checkpoints) after {time.perf_counter() - started:.1f} s")
            index = live.timeline
            count = len(index.history.checkpoints.checkpoints) + len(index.live.checkpoints.checkpoints)
            size = (index.history.held + index.live.held) / 2**20
            print(f"checkpoints: {count} (one per {index.every} messages) and their messages: {size:.1f} MiB")
            print(f"peak RSS {_rss_mb():.0f} MiB ({_rss_mb() - rss_before:.0f} MiB more than before the page's fold)")
            rng = random.Random(1)
            for _ in range(10):  # warm
                await live.state_at(rng.randint(1, events))
            times, cpu = [], []
            for _ in range(requests):
                seq = rng.randint(1, events)
                t0, c0 = time.perf_counter(), time.process_time()
                event, state = await live.state_at(seq)
                msgspec.json.encode({"event": event, "state": state})
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                assert event is not None, (seq, state)
            for name, values in (("wall", times), ("CPU of this process", cpu)):
                values.sort()
                pick = lambda q, v=values: v[min(len(v) - 1, int(q * len(v)))] * 1000  # noqa: E731
                print(
                    f"/timeline/{{seq}} at a random seq, one at a time ({requests} requests), {name}: "
                    f"p50 {pick(0.5):.1f} ms, p90 {pick(0.9):.1f} ms, p99 {pick(0.99):.1f} ms, "
                    f"max {values[-1] * 1000:.1f} ms, mean {statistics.mean(values) * 1000:.1f} ms (p99 < 50 ms wanted)"
                )
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            await live.close()
            await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--store", type=Path, help="nats-server's store: filled on the first run, reused after")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.requests, args.store))
