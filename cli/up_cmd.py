"""`exojet up`: a nats-server, a supervisor and a runner serving the default model."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bus import client, streams, subjects
from bus.codec import encode
from bus.envelope import Envelope
from bus.events import RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from bus.server import NatsServer, ServerError, default_store_dir
from bus.statuses import TERMINAL_TASK_STATUSES, RunnerFailed, TaskStatus, status_name
from bus.tasks import DownloadModel, LoadModel, Shard, Shutdown, StartWarmup, Task
from cli.timeline import message_of


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    # Own process group: Ctrl-C reaches `up`, which then stops the children in order.
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Watcher:
    """Prints the runner's transitions as they land in the log; resolves task waits."""

    def __init__(self, runner_id: str) -> None:
        self.runner_id = runner_id
        self.status = "Unregistered"
        self.incarnation = 0
        self.registered = asyncio.Event()
        self.terminal: dict[str, asyncio.Future[TaskStatusUpdated]] = {}

    def on_event(self, env: Envelope) -> None:
        match message_of(env):
            case RunnerRegistered(incarnation=inc, pid=pid):
                self.incarnation = inc
                print(f"  runner {self.runner_id} registered (incarnation {inc}, pid {pid})", flush=True)
                self.registered.set()
            case RunnerStatusUpdated(runner_status=status):
                new = status_name(status)
                why = f": {status.error_message}" if isinstance(status, RunnerFailed) else ""
                print(f"  {self.runner_id}: {self.status.removeprefix('Runner')} -> {new.removeprefix('Runner')}{why}",
                      flush=True)
                self.status = new
            case TaskStatusUpdated(task_id=task_id, task_status=task_status) as event if (
                task_status in TERMINAL_TASK_STATUSES and task_id in self.terminal
            ):
                if not self.terminal[task_id].done():
                    self.terminal[task_id].set_result(event)

    async def run(self, js: object, task: Task, timeout: float) -> TaskStatusUpdated:
        assert task.task_id is not None
        future = self.terminal[task.task_id] = asyncio.get_running_loop().create_future()
        await client.publish(js, subjects.task_subject(self.runner_id), encode(task), msg_id=task.task_id)
        return await asyncio.wait_for(future, timeout)


async def _drive(nats_url: str, runner_id: str, model_id: str, from_seq: int) -> int:
    nc = await client.connect(nats_url, name="exojet-up")
    watcher = _Watcher(runner_id)
    js = nc.jetstream()
    sub = await client.follow(js, watcher.on_event, start_seq=from_seq, subject=subjects.runner_events_subject(runner_id))
    try:
        await asyncio.wait_for(watcher.registered.wait(), 60)
        # Ids unique to this incarnation: a runner skips tasks already finished in the log.
        prefix = f"up-{runner_id}-{watcher.incarnation}-{uuid.uuid4().hex[:6]}"
        shard = Shard(model_id=model_id)
        for task in (DownloadModel(task_id=f"{prefix}-download", shard=shard),
                     LoadModel(task_id=f"{prefix}-load", shard=shard),
                     StartWarmup(task_id=f"{prefix}-warmup")):
            result = await watcher.run(js, task, timeout=600)
            if result.task_status != TaskStatus.COMPLETE:
                print(f"error: {type(task).__name__} {result.task_status}: {result.error_type}: {result.error_message}",
                      file=sys.stderr)
                return 1
        return 0 if watcher.status == "RunnerReady" else 1
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _shutdown_runner(nats_url: str, runner_id: str) -> None:
    """Ask the runner to shut down through the log, as any user would."""
    nc = await client.connect(nats_url, name="exojet-up")
    try:
        await client.publish(nc.jetstream(), subjects.task_subject(runner_id),
                             encode(Shutdown(task_id=f"up-{runner_id}-shutdown-{uuid.uuid4().hex[:6]}")))
    finally:
        await nc.close()


def up(port: int, monitor_port: int, models_dir: Path, runner_id: str, store_dir: Path | None) -> int:
    """Start everything, drive the runner to Ready, serve until Ctrl-C."""
    from models.smollm import DEFAULT_MODEL_ID, SmolLMNotInstalled, ensure_default_model

    started = time.perf_counter()
    try:
        ensure_default_model(models_dir)
    except SmolLMNotInstalled as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logs = (store_dir or default_store_dir()).parent / "logs"
    try:
        server = NatsServer(port=port, monitor_port=monitor_port, store_dir=store_dir,
                            log_file=logs / "nats-server.log").start()
    except ServerError as err:
        print(f"error: {err} (is another `exojet up` or nats-server already running on port {port}?)",
              file=sys.stderr)
        return 1
    print(f"nats-server  {server.url}  (store {server.store_dir})", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    runner: subprocess.Popen[bytes] | None = None
    try:
        from_seq = asyncio.run(_ensure(server.url)) + 1
        procs.append(_spawn(["supervisor", "--nats", server.url], logs / "supervisor.log"))
        runner = _spawn(["runner", "--id", runner_id, "--nats", server.url, "--models-dir", str(models_dir)],
                        logs / f"runner-{runner_id}.log")
        procs.append(runner)
        print(f"supervisor, runner {runner_id} started (logs in {logs})", flush=True)
        code = asyncio.run(_drive(server.url, runner_id, DEFAULT_MODEL_ID, from_seq))
        if code != 0:
            print(f"error: runner {runner_id} did not reach Ready; see {logs}", file=sys.stderr)
            return code
        print(f"Ready in {time.perf_counter() - started:.1f} s: {DEFAULT_MODEL_ID} on runner {runner_id}.\n"
              f"  exojet chat \"What is the capital of France?\"\n"
              f"  exojet state | exojet replay\nCtrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in procs):
            try:
                procs[0].wait(1.0)
            except subprocess.TimeoutExpired:
                continue
        dead = [p.args[3] for p in procs if p.poll() is not None]
        print(f"error: {', '.join(map(str, dead))} exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping: the runner shuts down through the log, then the supervisor and the server", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the bounded cleanup short and orphan the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if runner is not None and runner.poll() is None:
            asyncio.run(_shutdown_runner(server.url, runner_id))
            try:
                runner.wait(20)
            except subprocess.TimeoutExpired:
                pass  # _stop below escalates
        for proc in reversed(procs):
            _stop(proc)
        server.stop()


async def _ensure(url: str) -> int:
    """Create the streams; return the log's last sequence before we start anything."""
    nc = await client.connect(url, name="exojet-up")
    try:
        await streams.ensure_streams(nc.jetstream())
        return await client.last_seq(nc.jetstream())
    finally:
        await nc.close()
