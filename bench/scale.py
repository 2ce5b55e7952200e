"""Scale benchmark: a supervisor, a runner and the CLI on a 1,000,000-event log, each figure
against the same measure on an empty log in the same run.

  1. the log: 100 runners in 50 two-rank instances of a stand-in model serving routed chats
     (11 messages a chat: the command, each rank's task, Running, RunnerRunning, RunnerReady
     and terminal status), and every tenth chat also sent straight to `r1` (the real runner's
     id, so its own subject has a long history), published once without a sync per message (a scratch server
     config without `sync_interval: always`) and kept in --store for the next run;
  2. on each log, a real supervisor and a real runner (the tiny llama, its own instance):
     supervisor restart -> first answer (a snapshot stored when the previous one stopped),
     its RSS, p99 of every query, `exojet chat` wall time, runner restart -> Idle;
  3. 1,000 simulated runners at 1 Hz (heartbeats and a status event each a second):
     the supervisor's CPU and projection lag (bench/dispatch.py's load).

    .venv/bin/python bench/scale.py [--events 1000000] [--runners 1000] [--seconds 20] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import psutil  # noqa: E402
from loguru import logger  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from bench.dispatch import load, ms, percentile, request, spawn  # noqa: E402
from exojet.bus import streams, subjects  # noqa: E402
from exojet.bus.codec import encode  # noqa: E402
from exojet.bus.commands import DeleteInstance, PlaceInstance, RouteChatCompletion  # noqa: E402
from exojet.bus.events import (  # noqa: E402
    InstancePlaced,
    Placement,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.ids import chat_task_id, step_task_id  # noqa: E402
from exojet.bus.nats import client, stream_setup  # noqa: E402
from exojet.bus.ops.server import CONF_PATH, NatsServer  # noqa: E402
from exojet.bus.statuses import RunnerIdle, RunnerReady, RunnerRunning, TaskStatus  # noqa: E402
from exojet.bus.tasks import (  # noqa: E402
    ChatCompletion,
    ChatMessage,
    ConnectToGroup,
    DownloadModel,
    Group,
    LoadModel,
    Shard,
    StartWarmup,
)
from testbed import REPO  # noqa: E402
from testbed.tiny_model import write_tiny_llama  # noqa: E402

STAND_IN = "bench/stand-in"
INSTANCES = 50
HI = (ChatMessage("user", "Tell me about the sea"),)
QUERY_ROUNDS = 300


class _Log:
    """The messages of the big log, in order (subject, bytes)."""

    def __init__(self) -> None:
        self.n = 0

    def _event_id(self, runner: str) -> str:
        self.n += 1
        return f"{runner}:1:{self.n}"

    def status(self, runner: str, status: object) -> tuple[str, bytes]:
        event = RunnerStatusUpdated(
            event_id=self._event_id(runner),
            runner_id=runner,
            incarnation=1,
            runner_status=status,  # type: ignore[arg-type]
        )
        return subjects.runner_events_subject(runner), encode(event)

    def task_status(
        self, runner: str, task_id: str, status: TaskStatus, result: dict | None = None
    ) -> tuple[str, bytes]:
        event = TaskStatusUpdated(
            event_id=self._event_id(runner),
            runner_id=runner,
            incarnation=1,
            task_id=task_id,
            task_status=status,
            result=result,
        )
        return subjects.runner_events_subject(runner), encode(event)

    def messages(self, events: int) -> Iterator[tuple[str, bytes]]:
        count = 0

        def out(item: tuple[str, bytes]) -> tuple[str, bytes]:
            nonlocal count
            count += 1
            return item

        shard = Shard(model_id=STAND_IN)
        for j in range(INSTANCES):
            ranks = (f"sr{2 * j}", f"sr{2 * j + 1}")
            inst = f"inst-b{j}"
            for r in ranks:
                yield out(
                    (
                        subjects.runner_events_subject(r),
                        encode(RunnerRegistered(event_id=f"{r}:reg", runner_id=r, incarnation=1)),
                    )
                )
                yield out(self.status(r, RunnerIdle()))
            yield out((subjects.COMMANDS, encode(PlaceInstance(command_id=f"b{j}", model_id=STAND_IN, runners=ranks))))
            placements = tuple(Placement(runner_id=r, shard=shard, incarnation=1) for r in ranks)
            placed = InstancePlaced(
                event_id=f"placed-b{j}", instance_id=inst, model_id=STAND_IN, placements=placements, attempt=1
            )
            yield out((subjects.SUPERVISOR_EVENTS, encode(placed)))
            # Straight to Ready (a stand-in: the steps' runner statuses are not the point here).
            group = Group(group_id=f"{inst}.a1", world_size=2, rank=0, hosts=("127.0.0.1:1", "127.0.0.1:2"))
            for step in ("download", "connect", "load", "warmup"):
                for rank, r in enumerate(ranks):
                    task_id = step_task_id(inst, 1, step, r)
                    task = {
                        "download": DownloadModel(task_id=task_id, instance_id=inst, shard=shard),
                        "connect": ConnectToGroup(
                            task_id=task_id, instance_id=inst, group=msgspec.structs.replace(group, rank=rank)
                        ),
                        "load": LoadModel(task_id=task_id, instance_id=inst, shard=shard),
                        "warmup": StartWarmup(task_id=task_id, instance_id=inst),
                    }[step]
                    yield out((subjects.task_subject(r), encode(task)))
                    yield out(self.task_status(r, task_id, TaskStatus.COMPLETE))
            for r in ranks:
                yield out(self.status(r, RunnerReady()))
        # The real runner's id has a history of its own: every tenth chat also went straight to it.
        yield out(
            (
                subjects.runner_events_subject("r1"),
                encode(RunnerRegistered(event_id="r1:reg", runner_id="r1", incarnation=1)),
            )
        )
        yield out(self.status("r1", RunnerIdle()))
        k = 0
        while count < events:
            if k % 10 == 0:
                yield out(
                    (subjects.task_subject("r1"), encode(ChatCompletion(task_id=f"d{k}", messages=HI, max_tokens=4)))
                )
                yield out(self.task_status("r1", f"d{k}", TaskStatus.RUNNING))
                yield out(self.task_status("r1", f"d{k}", TaskStatus.COMPLETE))
            j = k % INSTANCES
            ranks = (f"sr{2 * j}", f"sr{2 * j + 1}")
            chat_id = f"chat-q{k}"
            yield out(
                (subjects.COMMANDS, encode(RouteChatCompletion(command_id=f"q{k}", model_id=STAND_IN, messages=HI)))
            )
            for rank, r in enumerate(ranks):
                task = ChatCompletion(
                    task_id=chat_task_id(chat_id, rank),
                    instance_id=f"inst-b{j}",
                    messages=HI,
                    max_tokens=16,
                    stream_id=chat_id,
                    emit_rank=0,
                )
                yield out((subjects.task_subject(r), encode(task)))
            for rank, r in enumerate(ranks):
                yield out(self.task_status(r, chat_task_id(chat_id, rank), TaskStatus.RUNNING))
                yield out(self.status(r, RunnerRunning()))
            for rank, r in enumerate(ranks):
                yield out(self.status(r, RunnerReady()))
                result = {"text": "The sea is wide and deep. " * 3, "finish_reason": "length", "completion_tokens": 16}
                yield out(
                    self.task_status(r, chat_task_id(chat_id, rank), TaskStatus.COMPLETE, result if rank == 0 else None)
                )
            k += 1


def _fast_conf(root: Path) -> Path:
    """nats.conf without a sync per message: for building the log only."""
    conf = root / "nats-build.conf"
    conf.write_text(CONF_PATH.read_text().replace("sync_interval: always", ""))
    return conf


async def build_log(store: Path, events: int) -> None:
    """Publish the big log into `store` once (pipelined acks, no sync per message)."""
    marker = store / f"built-{events}-v2"
    if marker.exists():
        print(f"log: reusing {events} events in {store}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(port=0, monitor_port=0, store_dir=store / "nats", conf=_fast_conf(Path(tmp))).start()
        try:
            nc = await client.connect(server.url, name="bench-build")
            js = nc.jetstream(publish_async_max_pending=20_000)
            await stream_setup.ensure_streams(js)
            started = time.perf_counter()
            for subject, data in _Log().messages(events):
                await js.publish_async(subject, data)
            await js.publish_async_completed()
            last = await client.last_seq(js)
            print(f"log: built {last} events in {time.perf_counter() - started:.1f} s")
            await nc.close()
        finally:
            server.stop()
    marker.touch()


async def _until_answer(nc: object, timeout: float = 600.0) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        while True:
            try:
                await request(nc, "state", limit=1)
                return time.perf_counter() - started
            except Exception:  # no responders yet: a restart is what we time
                await asyncio.sleep(0.01)


async def _restart_to_idle(nc: object, runner_id: str, start: object, timeout: float = 120.0) -> float:
    """Seconds from starting the runner (`start()`) to its RunnerIdle in the log."""
    idle = asyncio.Event()

    def on_event(env: object) -> None:
        message = msgspec.json.decode(env.data)  # type: ignore[attr-defined]
        if message.get("type") == "RunnerStatusUpdated" and message["runner_status"]["type"] == "RunnerIdle":
            idle.set()

    seq = await client.last_seq(nc.jetstream())  # type: ignore[attr-defined]
    sub = await client.follow(nc, on_event, start_seq=seq + 1, subject=subjects.runner_events_subject(runner_id))  # type: ignore[arg-type]
    started = time.perf_counter()
    start()  # type: ignore[operator]
    try:
        await asyncio.wait_for(idle.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return time.perf_counter() - started


async def _retire_real_instances(nc: object, url: str) -> None:
    """Delete what an earlier run placed on the real runner (a reused log keeps it)."""
    from exojet.projections.apply import apply
    from exojet.projections.state import ClusterState

    state = ClusterState()

    def fold(env: object) -> None:
        nonlocal state
        state = apply(state, env)  # type: ignore[arg-type]

    await client.replay(nc, fold)  # type: ignore[arg-type]
    js = nc.jetstream()  # type: ignore[attr-defined]
    for inst in state.instances.values():
        if inst.model_id == "local/tiny" and inst.status != "Deleted":
            await client.publish(js, subjects.COMMANDS, DeleteInstance(instance_id=inst.instance_id))  # type: ignore[arg-type]


async def measure(label: str, store: Path, models: Path, runners: int, seconds: float) -> dict[str, float]:
    """Every figure on one log (`store`); returns them by name."""
    figures: dict[str, float] = {}
    server = NatsServer(port=0, monitor_port=0, store_dir=store / "nats").start()
    procs: list[subprocess.Popen[bytes]] = []
    sup_args = ["supervisor", "--nats", server.url, "--heartbeat-timeout", "1000000", "--models-dir", str(models)]
    try:
        nc = await client.connect(server.url, name="bench")
        js = nc.jetstream()
        await stream_setup.ensure_streams(js)
        events = await client.last_seq(js)
        await _retire_real_instances(nc, server.url)
        # A first supervisor folds what is there and stores a snapshot when it stops.
        first = spawn(sup_args, store / "sup0.log")
        figures["supervisor first start: folds all after the store's snapshot, if any (s)"] = await _until_answer(nc)
        first.terminate()
        first.wait(120)
        restarts, rss = [], []
        for i in range(3):
            sup = spawn(sup_args, store / f"sup{i + 1}.log")
            restarts.append(await _until_answer(nc))
            rss.append(psutil.Process(sup.pid).memory_info().rss / 2**20)
            if i < 2:
                sup.terminate()
                sup.wait(120)
        procs.append(sup)
        figures["supervisor restart -> first answer (s)"] = statistics.median(restarts)
        figures["supervisor RSS (MB)"] = statistics.median(rss)

        # Its first start on this log: no task consumer (an earlier run's is removed), so its
        # whole subject is read.
        try:
            await js.delete_consumer(streams.LOG_STREAM, streams.task_consumer_name("r1"))
        except NotFoundError:
            pass
        figures["runner first start -> Idle (s)"] = await _restart_to_idle(
            nc,
            "r1",
            lambda: procs.append(
                spawn(["runner", "--id", "r1", "--nats", server.url, "--models-dir", str(models)], store / "r1.log")
            ),
        )
        placed_at = time.perf_counter()
        ack = await client.publish(
            js, subjects.COMMANDS, PlaceInstance(command_id=f"real-{events}", model_id="local/tiny", runners=("r1",))
        )
        instance = f"inst-real-{events}"
        async with asyncio.timeout(300):
            while (inst := (await request(nc, "instance", instance_id=instance, min_seq=ack.seq, timeout=5.0)))[
                "instance"
            ]["status"] != "Ready":
                await asyncio.sleep(0.1)
        figures["real instance placed -> Ready (s)"] = time.perf_counter() - placed_at
        for endpoint, body in (
            ("state", {}),
            ("runner", {"runner_id": "r1"}),
            ("task", {"task_id": step_task_id(instance, inst["instance"]["attempt"], "warmup", "r1")}),
            ("instance", {"instance_id": instance}),
        ):
            times = []
            for _ in range(QUERY_ROUNDS):
                started = time.perf_counter()
                reply = await request(nc, endpoint, **body)
                times.append(time.perf_counter() - started)
                assert "error" not in reply, reply
            figures[f"query {endpoint} p99 (ms)"] = percentile(times, 99) * 1000
            figures[f"query {endpoint} reply (KB)"] = len(encode(reply)) / 1024
        chats = []
        for _ in range(5):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "exojet.cli.main", "chat", "hi", "--model", "local/tiny", "--max-tokens", "4"]
                + ["--nats", server.url],
                cwd=REPO,
                capture_output=True,
                timeout=120,
            )
            chats.append(time.perf_counter() - started)
            assert done.returncode == 0, done.stderr.decode()
        figures["exojet chat wall time (s)"] = statistics.median(chats)

        # Unplaced, the runner restarts to Idle and stays there.
        ack = await client.publish(js, subjects.COMMANDS, DeleteInstance(instance_id=instance))
        async with asyncio.timeout(60):
            while (await request(nc, "runner", runner_id="r1", min_seq=ack.seq, limit=0))["runner"][
                "status"
            ] != "RunnerIdle":
                await asyncio.sleep(0.1)
        restarts = []
        for i in range(3):
            procs[1].terminate()
            procs[1].wait(60)
            log = store / f"r1-{i}.log"

            def start(log: Path = log) -> None:
                procs[1] = spawn(["runner", "--id", "r1", "--nats", server.url, "--models-dir", str(models)], log)

            restarts.append(await _restart_to_idle(nc, "r1", start))
        figures["runner restart -> Idle, from its ack floor (s)"] = statistics.median(restarts)

        before, started = await client.last_seq(js), time.perf_counter()
        cpu, lags = await load(nc, js, server.url, psutil.Process(sup.pid), runners, seconds)
        figures[f"{runners} runners at 1 Hz: events folded a second"] = (await client.last_seq(js) - before) / (
            time.perf_counter() - started
        )
        figures[f"{runners} runners at 1 Hz: supervisor CPU (% of a core)"] = cpu
        figures[f"{runners} runners at 1 Hz: projection lag p99 (ms)"] = percentile(lags, 99) * 1000
        print(f"{label}: {events} events; projection lag {ms(lags)}", flush=True)
        await nc.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        server.stop()
    return figures


async def main(events: int, runners: int, seconds: float, store: Path) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    store.mkdir(parents=True, exist_ok=True)
    await build_log(store / "big", events)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_tiny_llama(models / "local--tiny")
        empty = await measure("empty log", Path(tmp) / "empty", models, runners, seconds)
        big = await measure(f"{events}-event log", store / "big", models, runners, seconds)
    print(f"\n{'figure':58} {'empty log':>12} {f'{events} events':>16} {'ratio':>8}")
    for name, base in empty.items():
        value = big[name]
        ratio = f"{value / base:.2f}x" if base else "-"
        print(f"{name:58} {base:12.3f} {value:16.3f} {ratio:>8}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runners", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--store", type=Path, default=Path.home() / ".cache" / "exojet-bench-scale")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.runners, args.seconds, args.store))
