"""`exojet up`: a nats-server, a supervisor, a runner (and the API) serving the default
model, each started again when it dies (see up_children.py and up_instance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.commands import DeleteInstance
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops import parent_death
from exojet.bus.ops.server import NatsServer, ServerError, default_store_dir
from exojet.bus.tasks import Shutdown
from exojet.cli.api_key import API_KEY_ENV
from exojet.cli.up_children import DEFAULT_POLICY, Child, ChildKeepsDying, StartFailed, keep_alive
from exojet.cli.up_instance import InstanceLost, Serving, Watcher, drive, keep_serving

T = TypeVar("T")


@dataclass(frozen=True)
class ApiOptions:
    """Where `up`'s API listens and the key it requires (checked beforehand: cli/api_key.py)."""

    host: str = "127.0.0.1"
    key: str | None = None
    allow_no_key: bool = False

    def child(self, nats_url: str, port: int) -> tuple[list[str], dict[str, str] | None]:
        """`exojet api`'s arguments and environment: the key goes in the environment
        (`$EXO_API_KEY`), never on a command line every local user reads in `ps`."""
        args = ["api", "--nats", nats_url, "--host", self.host, "--port", str(port)]
        if self.allow_no_key:
            args.append("--allow-no-key")
        return args, ({**os.environ, API_KEY_ENV: self.key} if self.key else None)

    def url(self, port: int) -> str:
        """Where a browser on this host reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    # Own process group: Ctrl-C reaches `up`, which then stops the children in order.
    # Should `up` die without its cleanup (SIGKILL), they die with it: the next
    # `up` finds no runner, supervisor or server of ours holding ports or models.
    # The child holds its own copy of the log's descriptor: ours is closed (started again and
    # again, a child must not leave one behind each time).
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "exojet.cli.main", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=parent_death.preexec(signal.SIGKILL),
        )


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
    api: ApiOptions | None = None,
) -> int:
    """Start everything (the API too, on `api_port` unless 0), drive the runner to Ready, serve until
    Ctrl-C, starting again whatever dies (up to the restart policy's bound)."""
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
    url = server.url
    children: list[Child] = []
    serving = Serving()
    try:
        from_seq = asyncio.run(_ensure(url)) + 1
        children.append(Child("nats-server", lambda: _start_again(server), DEFAULT_POLICY, server.process))
        supervisor = ["supervisor", "--nats", url, "--models-dir", str(models_dir)]
        children.append(Child("supervisor", lambda: _spawn(supervisor, logs / "supervisor.log"), DEFAULT_POLICY))
        runner = ["runner", "--id", runner_id, "--nats", url, "--models-dir", str(models_dir), "--engine", engine]
        children.append(Child("runner", lambda: _spawn(runner, logs / f"runner-{runner_id}.log"), DEFAULT_POLICY))
        api_options = api or ApiOptions()
        if api_port:
            api_args, api_env = api_options.child(url, api_port)
            children.append(Child("api", lambda: _spawn(api_args, logs / "api.log", api_env), DEFAULT_POLICY))
        print(f"supervisor, runner {runner_id} started (logs in {logs})", flush=True)

        def say_ready() -> None:
            api_lines = (
                f"OpenAI-compatible API: {api_options.url(api_port)}/v1\nLive page: {api_options.url(api_port)}/\n"
                if api_port
                else ""
            )
            print(
                f"Ready in {time.perf_counter() - started:.1f} s: {DEFAULT_MODEL_ID} on runner {runner_id}.\n"
                f"{api_lines}"
                f'  exojet chat "What is the capital of France?"\n'
                f"  exojet state | exojet replay\nCtrl-C stops everything.",
                flush=True,
            )

        watcher = Watcher(runner_id)
        asyncio.run(_serve(url, children, watcher, DEFAULT_MODEL_ID, from_seq, serving, say_ready))
        print(f"error: runner {runner_id} did not reach Ready; see {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping: the runner shuts down through the log, then the supervisor and the server", flush=True)
        return 0
    except (ChildKeepsDying, InstanceLost) as err:
        print(f"error: {err}; stopping everything (logs in {logs})", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C or kill must not cut the bounded cleanup short and orphan the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        runner_proc = next((c.proc for c in children if c.role == "runner"), None)
        if runner_proc is not None and runner_proc.poll() is None:
            try:
                asyncio.run(_shutdown_runner(url, runner_id, serving.instance_id))
            except (client.NatsUnreachable, *client.TRANSIENT_ERRORS) as err:
                print(f"could not ask the runner to shut down through the log ({err!r}); stopping it", flush=True)
            try:
                runner_proc.wait(20)
            except subprocess.TimeoutExpired:
                pass  # stop_process below escalates
        for child in reversed(children):
            if child.role != "nats-server":
                stop_process(child.proc)
        server.stop()


async def _serve(
    url: str,
    children: list[Child],
    watcher: Watcher,
    model_id: str,
    from_seq: int,
    serving: Serving,
    say_ready: Callable[[], None],
) -> None:
    """Keep the children alive, drive the runner to Ready, then serve its instance again whenever
    it comes back. Returns only if the first instance ended instead of Ready; raises when `up` must stop."""
    keeping = asyncio.ensure_future(keep_alive(children))
    try:
        # Waits for the server, which the keeper starts again should it die meanwhile.
        nc = await _unless_dying(keeping, client.connect(url, name="exojet-up", wait=True))
        try:
            sub = await client.follow(
                nc, watcher.on_event, start_seq=from_seq, subject=subjects.runner_events_subject(watcher.runner_id)
            )
            try:
                if not await _unless_dying(keeping, drive(nc, watcher, model_id, serving)):
                    return
                watcher.bars.stop()
                say_ready()
                await _unless_dying(keeping, keep_serving(nc, watcher, model_id, serving))
            finally:
                watcher.bars.stop()
                # Bounded: on Ctrl-C this runs while asyncio cancels every task, and a goodbye
                # to the server must not hold the stop (it held it 5-20 s).
                async with _briefly():
                    await sub.unsubscribe()
        finally:
            async with _briefly():
                await client.close(nc)
    finally:
        keeping.cancel()
    raise AssertionError("keep_serving never returns")


@contextlib.asynccontextmanager
async def _briefly(seconds: float = 1.0) -> AsyncIterator[None]:
    """Give up on the work inside after `seconds` (a cleanup that must not hold a stop)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            yield


async def _unless_dying(keeping: asyncio.Future[NoReturn], work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless a child keeps dying first (ChildKeepsDying then)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait((keeping, task), return_when=asyncio.FIRST_COMPLETED)
        if keeping.done():
            keeping.result()
        return task.result()
    finally:
        task.cancel()


def _start_again(server: NatsServer) -> subprocess.Popen[bytes]:
    """Our nats-server again, on the same port and store (the others reconnect to it)."""
    try:
        server.start()
    except ServerError as err:
        raise StartFailed(str(err)) from err
    assert server.process is not None
    return server.process


async def _ensure(url: str) -> int:
    """Create the streams; return the log's last sequence before we start anything."""
    nc = await client.connect(url, name="exojet-up")
    try:
        await stream_setup.ensure_streams(nc.jetstream())
        return await client.last_seq(nc.jetstream())
    finally:
        await nc.close()
