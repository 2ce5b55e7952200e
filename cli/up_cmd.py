"""`exojet up`: a nats-server, a supervisor and a runner serving the default model."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import cast

from exojet.bus import client, parent_death, streams, subjects
from exojet.bus.codec import encode
from exojet.bus.commands import DeleteInstance, PlaceInstance
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated
from exojet.bus.query_client import QueryFailed, first_answer, query
from exojet.bus.server import NatsServer, ServerError, default_store_dir
from exojet.bus.statuses import RunnerFailed, status_name
from exojet.bus.tasks import Shutdown
from exojet.cli.progress import ProgressBars
from exojet.projections.instances import instance_id_of
from exojet.projections.words import message_of


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    # Own process group: Ctrl-C reaches `up`, which then stops the children in order.
    # Should `up` die without its cleanup (SIGKILL), they die with it: the next
    # `up` finds no runner, supervisor or server of ours holding ports or models.
    return subprocess.Popen(
        [sys.executable, "-m", "exojet.cli.main", *args],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=parent_death.preexec(signal.SIGKILL),
    )


def _role(proc: subprocess.Popen[bytes]) -> str:
    """The subcommand a `_spawn`ed process runs (its argv is python, -m, module, role, ...)."""
    return cast(list[str], proc.args)[3]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class _Watcher:
    """Prints the runner's transitions as they land in the log (with progress bars on a terminal)."""

    def __init__(self, runner_id: str) -> None:
        self.runner_id = runner_id
        self.bars = ProgressBars(sys.stdout)
        self.status = "Unregistered"
        self.incarnation = 0
        self.registered_seq = 0
        self.registered = asyncio.Event()
        self._changed = asyncio.Event()

    def on_event(self, env: Envelope) -> None:
        self.bars.on_event(env)
        match message_of(env):
            case RunnerRegistered(incarnation=inc, pid=pid):
                self.incarnation = inc
                self.registered_seq = env.seq
                self.bars.say(f"  runner {self.runner_id} registered (incarnation {inc}, pid {pid})")
                self.registered.set()
            case RunnerStatusUpdated(runner_status=status):
                new = status_name(status)
                why = f": {status.error_message}" if isinstance(status, RunnerFailed) else ""
                self.bars.say(
                    f"  {self.runner_id}: {self.status.removeprefix('Runner')} -> {new.removeprefix('Runner')}{why}"
                )
                self.status = new
        self._changed.set()

    async def changed(self, timeout: float = 1.0) -> None:
        """Until the runner writes again (or `timeout`, so the caller re-checks the projection)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


async def _drive(server: NatsServer, runner_id: str, model_id: str, from_seq: int) -> str | None:
    """Place `model_id` on the runner and follow it to Ready; returns the instance id (None on failure)."""
    nc = await client.connect(server.url, name="exojet-up")
    # Started from this (the main) thread: its parent-death signal must not be tied to a worker's.
    keeper = asyncio.ensure_future(_keep_serving_every_second(server))
    watcher = _Watcher(runner_id)
    js = nc.jetstream()
    sub = await client.follow(
        nc, watcher.on_event, start_seq=from_seq, subject=subjects.runner_events_subject(runner_id)
    )
    try:
        await asyncio.wait_for(watcher.registered.wait(), 60)
        # This runner serves our instance only: retire what an earlier `up` left on it.
        await first_answer(nc, min_seq=watcher.registered_seq)
        mine = await query(nc, "runner", runner_id=runner_id, min_seq=watcher.registered_seq)
        for inst in mine["instances"].values():
            await client.publish_until_stored(
                js,
                subjects.COMMANDS,
                DeleteInstance(instance_id=inst["instance_id"]),
                msg_id=f"up-delete-{inst['instance_id']}-{uuid.uuid4().hex[:6]}",
            )
        # The planner drives DownloadModel -> LoadModel -> StartWarmup; we watch.
        command_id = f"up-{runner_id}-{watcher.incarnation}-{uuid.uuid4().hex[:6]}"
        ack = await client.publish_until_stored(
            js,
            subjects.COMMANDS,
            PlaceInstance(command_id=command_id, model_id=model_id, runners=(runner_id,)),
            msg_id=command_id,
        )
        instance_id = instance_id_of(command_id, ack.seq)
        watcher.bars.say(f"  placed {instance_id}: {model_id} on {runner_id}")
        async with asyncio.timeout(600):
            while True:
                try:
                    inst = (await query(nc, "instance", instance_id=instance_id, min_seq=ack.seq))["instance"]
                except QueryFailed as err:
                    # NATS or the supervisor away for a moment: ask again once it is back.
                    print(f"  waiting for the supervisor ({err})", flush=True)
                    await watcher.changed()
                    continue
                if inst.get("status") == "Ready":
                    return instance_id
                if inst.get("status") in ("Failed", "Deleted"):
                    print(f"error: {instance_id} {inst['status']}: {inst.get('reason')}", file=sys.stderr)
                    return None
                await watcher.changed()
    finally:
        watcher.bars.stop()
        keeper.cancel()
        await sub.unsubscribe()
        await nc.close()


async def _keep_serving_every_second(server: NatsServer) -> None:
    while True:
        await asyncio.sleep(1.0)
        _keep_serving(server)


async def _shutdown_runner(nats_url: str, runner_id: str, instance_id: str | None) -> None:
    """Delete our instance and ask the runner to shut down, through the log as any user would."""
    nc = await client.connect(nats_url, name="exojet-up")
    try:
        if instance_id is not None:
            await client.publish(nc.jetstream(), subjects.COMMANDS, DeleteInstance(instance_id=instance_id))
        await client.publish(
            nc.jetstream(),
            subjects.task_subject(runner_id),
            encode(Shutdown(task_id=f"up-{runner_id}-shutdown-{uuid.uuid4().hex[:6]}")),
        )
    finally:
        await nc.close()


def up(
    port: int,
    monitor_port: int,
    models_dir: Path,
    runner_id: str,
    store_dir: Path | None,
    api_port: int = 0,
    engine: str = "auto",
) -> int:
    """Start everything (the API too, on `api_port` unless 0), drive the runner to Ready, serve until Ctrl-C."""
    from exojet.models.smollm import DEFAULT_MODEL_ID, SmolLMNotInstalled, ensure_default_model

    started = time.perf_counter()
    # Started in the background by a script, we would inherit an ignored SIGINT;
    # SIGTERM (kill, a service manager) must clean up just like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        ensure_default_model(models_dir)
    except SmolLMNotInstalled as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logs = (store_dir or default_store_dir()).parent / "logs"
    try:
        server = NatsServer(
            port=port,
            monitor_port=monitor_port,
            store_dir=store_dir,
            log_file=logs / "nats-server.log",
            die_with_parent=True,
        ).start()
    except ServerError as err:
        print(f"error: {err} (is another `exojet up` or nats-server already running on port {port}?)", file=sys.stderr)
        return 1
    print(f"nats-server  {server.url}  (store {server.store_dir})", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    runner: subprocess.Popen[bytes] | None = None
    instance_id: str | None = None
    try:
        from_seq = asyncio.run(_ensure(server.url)) + 1
        procs.append(
            _spawn(["supervisor", "--nats", server.url, "--models-dir", str(models_dir)], logs / "supervisor.log")
        )
        runner = _spawn(
            ["runner", "--id", runner_id, "--nats", server.url, "--models-dir", str(models_dir), "--engine", engine],
            logs / f"runner-{runner_id}.log",
        )
        procs.append(runner)
        if api_port:
            procs.append(
                _spawn(["api", "--nats", server.url, "--port", str(api_port)], logs / "api.log"),
            )
        print(f"supervisor, runner {runner_id} started (logs in {logs})", flush=True)
        instance_id = asyncio.run(_drive(server, runner_id, DEFAULT_MODEL_ID, from_seq))
        if instance_id is None:
            print(f"error: runner {runner_id} did not reach Ready; see {logs}", file=sys.stderr)
            return 1
        api = (
            f"OpenAI-compatible API: http://127.0.0.1:{api_port}/v1\nLive page: http://127.0.0.1:{api_port}/\n"
            if api_port
            else ""
        )
        print(
            f"Ready in {time.perf_counter() - started:.1f} s: {DEFAULT_MODEL_ID} on runner {runner_id}.\n"
            f"{api}"
            f'  exojet chat "What is the capital of France?"\n'
            f"  exojet state | exojet replay\nCtrl-C stops everything.",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            _keep_serving(server)
            try:
                procs[0].wait(1.0)
            except subprocess.TimeoutExpired:
                continue
        dead = [_role(p) for p in procs if p.poll() is not None]
        print(f"error: {', '.join(dead)} exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping: the runner shuts down through the log, then the supervisor and the server", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the bounded cleanup short and orphan the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if runner is not None and runner.poll() is None:
            try:
                asyncio.run(_shutdown_runner(server.url, runner_id, instance_id))
            except (client.NatsUnreachable, *client.TRANSIENT_ERRORS) as err:
                print(f"could not ask the runner to shut down through the log ({err!r}); stopping it", flush=True)
            try:
                runner.wait(20)
            except subprocess.TimeoutExpired:
                pass  # stop_process below escalates
        for proc in reversed(procs):
            stop_process(proc)
        server.stop()


def _keep_serving(server: NatsServer) -> None:
    """Start our nats-server again (same port, same store) if it died; the others reconnect to it."""
    assert server.process is not None
    code = server.process.poll()
    if code is None:
        return
    print(f"nats-server exited with code {code}; starting it again on port {server.port}", flush=True)
    try:
        server.start()
    except ServerError as err:
        print(f"nats-server did not start again ({err}); trying again in a second", file=sys.stderr, flush=True)
        return
    print(f"nats-server  {server.url}  back", flush=True)


async def _ensure(url: str) -> int:
    """Create the streams; return the log's last sequence before we start anything."""
    nc = await client.connect(url, name="exojet-up")
    try:
        await streams.ensure_streams(nc.jetstream())
        return await client.last_seq(nc.jetstream())
    finally:
        await nc.close()
