"""Dispatch benchmark: a task's way through runner and supervisor, and a supervisor under 200 runners.

In one run, against a fresh nats-server:
  1. dispatch: a one-token ChatCompletion published as `nats pub` does (core
     publish, no ack) to a Ready runner on the tiny model, until its Complete is
     visible through a supervisor `task` query with `min_seq` (the query
     long-polls: it answers once the projection passed the given sequence);
  2. floor: a bare JetStream publish + pull + ack round trip on a scratch stream;
  printing p50/p99 of both and the p50 ratio (target <= 3x);
  2b. contract chain: what DESIGN.md itself asks of a chat's way, in bare nats-py on a
  scratch stream (a pulled task, four writes each fenced on the one before, the last
  seen by a subscriber): how much of exojet's share the contract takes before any code;
  3. load: 200 simulated runners heartbeating at 1 Hz and writing one status
     event a second each: the supervisor's CPU and its projection lag (time
     from a probe event's ack to a `runner` query with that `min_seq` answering).

    .venv/bin/python bench/dispatch.py [--chats 200] [--runners 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import psutil  # noqa: E402
from loguru import logger  # noqa: E402
from nats.js import api  # noqa: E402

from exojet.bus import subjects  # noqa: E402
from exojet.bus.codec import encode  # noqa: E402
from exojet.bus.commands import DeleteInstance, PlaceInstance  # noqa: E402
from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated  # noqa: E402
from exojet.bus.ids import instance_id_of  # noqa: E402
from exojet.bus.nats import client, stream_setup  # noqa: E402
from exojet.bus.nats.query_client import first_answer  # noqa: E402
from exojet.bus.statuses import RunnerDownloading, RunnerIdle  # noqa: E402
from exojet.bus.tasks import ChatCompletion, ChatMessage  # noqa: E402
from testbed import REPO  # noqa: E402
from testbed.tiny_cluster import tiny_cluster_dir  # noqa: E402


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exojet.cli.main", *args], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1000:.2f} ms, p99 {percentile(values, 99) * 1000:.2f} ms"


async def request(nc, endpoint: str, **body: object) -> dict:
    """A raw query: errors (NotFound) still carry the projection's `seq`."""
    msg = await nc.request(f"{subjects.QUERY_PREFIX}.{endpoint}", msgspec.json.encode(body), timeout=30)
    return msgspec.json.decode(msg.data)


async def until_ready(nc, instance_id: str, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        seq = 0
        while True:
            reply = await request(nc, "state", min_seq=seq + 1, timeout=5.0)
            seq = reply.get("seq", seq)
            inst = reply.get("instances", {}).get(instance_id)
            if inst is not None and inst["status"] in ("Ready", "Failed"):
                if inst["status"] != "Ready":
                    raise RuntimeError(f"{instance_id} failed: {inst['reason']}")
                return


async def dispatch_latencies(nc, chats: int, tag: str) -> tuple[list[float], list[float], list[float]]:
    """Core publish of a one-token chat -> its Complete seen by a min_seq task query;
    and -> its Complete event arriving on a plain subscription (the runner's share);
    and the engine's own time in each (`engine_seconds` of its result, timed in the engine child)."""
    latencies, on_bus, engine = [], [], []
    seq = (await request(nc, "state"))["seq"]
    completed: dict[str, float] = {}
    engine_seconds: dict[str, float] = {}

    async def on_event(msg) -> None:
        event = msgspec.json.decode(msg.data)
        if event.get("type") == "TaskStatusUpdated" and event.get("task_status") == "Complete":
            completed[event["task_id"]] = time.perf_counter()
            engine_seconds[event["task_id"]] = event["result"]["engine_seconds"]

    sub = await nc.subscribe(subjects.runner_events_subject("r1"), cb=on_event)
    for i in range(chats):
        task = ChatCompletion(task_id=f"bench-{tag}-{i}", messages=(ChatMessage("user", "hi"),), max_tokens=1)
        started = time.perf_counter()
        await nc.publish(subjects.task_subject("r1"), encode(task))
        while True:
            reply = await request(nc, "task", task_id=task.task_id, min_seq=seq + 1, timeout=10.0)
            seq = reply["seq"]
            if reply.get("task", {}).get("status") in ("Complete", "Failed"):
                break
        latencies.append(time.perf_counter() - started)
        assert reply["task"]["status"] == "Complete", reply
        if task.task_id in completed:
            on_bus.append(completed[task.task_id] - started)
            engine.append(engine_seconds[task.task_id])
    await sub.unsubscribe()
    return latencies, on_bus, engine


async def floor_latencies(js, rounds: int) -> list[float]:
    """Bare JetStream: publish (acked), pull one, ack it."""
    await js.add_stream(api.StreamConfig(name="BENCH_FLOOR", subjects=["bench.floor"], storage=api.StorageType.FILE))
    sub = await js.pull_subscribe("bench.floor", durable="floor", stream="BENCH_FLOOR")
    latencies = []
    for i in range(rounds):
        started = time.perf_counter()
        await js.publish("bench.floor", b'{"type":"ChatCompletion","i":%d}' % i)
        [msg] = await sub.fetch(1, timeout=5)
        await msg.ack_sync()
        latencies.append(time.perf_counter() - started)
    return latencies


async def contract_latencies(nc, js, rounds: int) -> list[float]:
    """What DESIGN.md asks of a chat's way and nothing else: a core-published task stored and
    pulled by a waiting durable consumer, the four writes of its transitions (task Running,
    RunnerRunning, RunnerReady, task Complete), each fenced on the sequence of the one before,
    the task acked, and the last write seen on a core subscription (no engine, no chunks)."""
    await js.add_stream(api.StreamConfig(name="BENCH_CHAIN", subjects=["bench.chain.>"], storage=api.StorageType.FILE))
    queue = await js.pull_subscribe("bench.chain.task", durable="chain", stream="BENCH_CHAIN")
    seen: asyncio.Queue[float] = asyncio.Queue()

    async def on_event(msg) -> None:
        if msg.data.endswith(b"Complete"):
            seen.put_nowait(time.perf_counter())

    watch = await nc.subscribe("bench.chain.events", cb=on_event)
    last, latencies = 0, []
    for i in range(rounds):
        pulled = asyncio.ensure_future(queue.fetch(1, timeout=5))
        await asyncio.sleep(0)  # let the pull request go out first: the runner's is always waiting
        started = time.perf_counter()
        await nc.publish("bench.chain.task", b'{"type":"ChatCompletion","i":%d}' % i)
        [msg] = await pulled
        for step in ("Running", "RunnerRunning", "RunnerReady", "Complete"):
            headers = {"Nats-Msg-Id": f"{i}:{step}", "Nats-Expected-Last-Subject-Sequence": str(last)}
            last = (await js.publish("bench.chain.events", step.encode(), headers=headers)).seq
        await msg.ack()
        latencies.append(await asyncio.wait_for(seen.get(), 5) - started)
    await watch.unsubscribe()
    return latencies


async def simulate(url: str, runners: int, seconds: float) -> None:
    """Runners sim1..simN: register, then heartbeat and write a status event every second."""
    nc = await client.connect(url, name="bench-sim")
    js = nc.jetstream()
    ids = [f"sim{i}" for i in range(1, runners + 1)]
    n = 0

    def status(runner_id: str, s: msgspec.Struct) -> RunnerStatusUpdated:
        nonlocal n
        n += 1
        return RunnerStatusUpdated(
            event_id=f"{runner_id}:{n}", runner_id=runner_id, incarnation=1, runner_status=s, at=time.time()
        )

    await asyncio.gather(
        *(
            client.publish(
                js, subjects.runner_events_subject(r), RunnerRegistered(event_id=f"{r}:reg", runner_id=r, incarnation=1)
            )
            for r in ids
        )
    )
    busy = [RunnerIdle(), RunnerDownloading()]  # a transition the contract allows, back and forth
    started = time.monotonic()
    tick = 0
    while time.monotonic() - started < seconds:
        beat = time.time()
        for r in ids:
            await nc.publish(subjects.heartbeat_subject(r), encode({"runner_id": r, "incarnation": 1, "at": beat}))
        await asyncio.gather(
            *(client.publish(js, subjects.runner_events_subject(r), status(r, busy[tick % 2])) for r in ids)
        )
        tick += 1
        await asyncio.sleep(max(0.0, started + tick - time.monotonic()))  # 1 Hz pacing
    await nc.close()


def _simulate(url: str, runners: int, seconds: float) -> None:
    asyncio.run(simulate(url, runners, seconds))


async def load(nc, js, url: str, sup: psutil.Process, runners: int, seconds: float) -> tuple[float, list[float]]:
    """Simulated runners (another process, so their publishing does not delay the
    probe's clock); returns the supervisor's CPU % and the probe lags."""
    sim = multiprocessing.get_context("spawn").Process(target=_simulate, args=(url, runners, seconds))
    await client.publish(
        js,
        subjects.runner_events_subject("probe"),
        RunnerRegistered(event_id="probe:reg", runner_id="probe", incarnation=1),
    )
    sim.start()
    sup.cpu_percent()
    lags: list[float] = []
    n = 0
    while sim.is_alive():
        n += 1
        # The probe runner writes Idle again and again: an anomaly each, which costs the same to fold.
        ack = await client.publish(
            js,
            subjects.runner_events_subject("probe"),
            RunnerStatusUpdated(event_id=f"probe:{n}", runner_id="probe", incarnation=1, runner_status=RunnerIdle()),
        )
        started = time.perf_counter()
        await request(nc, "runner", runner_id="probe", min_seq=ack.seq, timeout=10.0)
        lags.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)  # probe pacing, not synchronisation
    cpu = sup.cpu_percent()
    sim.join()
    return cpu, lags


async def main(chats: int, runners: int, seconds: float) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tiny_cluster_dir() as (root, models, server):
        procs = []
        try:
            nc = await client.connect(server.url, name="bench")
            js = nc.jetstream()
            await stream_setup.ensure_streams(js)
            procs.append(spawn(["supervisor", "--nats", server.url, "--models-dir", str(models)], root / "sup.log"))
            procs.append(
                spawn(["runner", "--id", "r1", "--nats", server.url, "--models-dir", str(models)], root / "r1.log")
            )
            await first_answer(nc)
            ack = await client.publish(js, subjects.COMMANDS, PlaceInstance(model_id="local/tiny", runners=("r1",)))
            await until_ready(nc, instance_id_of(None, ack.seq))
            await dispatch_latencies(nc, 5, "warm")  # warm the paths once
            dispatch, runner_share, engine = await dispatch_latencies(nc, chats, "run")
            floor = await floor_latencies(js, chats)
            contract = await contract_latencies(nc, js, chats)
            print(f"dispatch (core publish -> Complete via supervisor query, 1-token chat): {ms(dispatch)}")
            print(f"  of which the runner (core publish -> Complete event on a core subscription): {ms(runner_share)}")
            print(f"  of which the engine's own time (in the engine child): {ms(engine)}")
            # Each chat's own total minus its own engine time, so engine jitter is not counted as exojet's.
            exojet = [total - own for total, own in zip(runner_share, engine, strict=True)]
            print(f"exojet's share (runner's share minus the engine's time): {ms(exojet)}")
            print(f"floor (JetStream publish + pull + ack): {ms(floor)}")
            print(f"ratio p50 dispatch/floor: {percentile(dispatch, 50) / percentile(floor, 50):.1f}x")
            share = percentile(exojet, 50) / percentile(floor, 50)
            print(f"ratio p50 exojet's share/floor: {share:.1f}x (target <= 3x)")
            print(f"contract chain (a pulled task and the four fenced writes DESIGN.md asks for): {ms(contract)}")
            print(f"ratio p50 contract chain/floor: {percentile(contract, 50) / percentile(floor, 50):.1f}x")
            print(f"ratio p50 exojet's share/contract chain: {percentile(exojet, 50) / percentile(contract, 50):.1f}x")
            # Delete the instance and stop its runner, so nothing is placed on the simulated runners.
            await client.publish(js, subjects.COMMANDS, DeleteInstance(instance_id=instance_id_of(None, ack.seq)))
            runner = procs.pop()
            runner.terminate()
            runner.wait(30)
            cpu, lags = await load(nc, js, server.url, psutil.Process(procs[0].pid), runners, seconds)
            print(
                f"{runners} simulated runners at 1 Hz for {seconds:g} s: supervisor CPU {cpu:.0f}% of one core; "
                f"projection lag {ms(lags)} ({len(lags)} probes)"
            )
            await nc.close()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--runners", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.chats, args.runners, args.seconds))
