"""`exojet up`: a nats-server, a supervisor, a runner (and the API) serving the default
model, each started again when it dies (see up_children.py and up_instance.py)."""

from __future__ import annotations

import argparse
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
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from exojet.api.config import DEFAULT_HOST as DEFAULT_API_HOST
from exojet.api.config import DEFAULT_PORT as DEFAULT_API_PORT
from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.commands import DeleteInstance
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops import parent_death
from exojet.bus.ops.server import DEFAULT_MONITOR_PORT, DEFAULT_PORT, NatsServer, ServerError, default_store_dir
from exojet.bus.tasks import Shutdown
from exojet.cli.api_key import API_KEY_ENV, BadApiKeyFile, NoApiKey, add_key_arguments, api_key_from_args
from exojet.cli.options import Subparsers, add_engine, add_models_dir, fail
from exojet.cli.up_children import DEFAULT_POLICY, Child, ChildKeepsDying, StartFailed, keep_alive
from exojet.cli.up_instance import InstanceLost, Serving, Watcher, drive, keep_serving

T = TypeVar("T")
DEFAULT_RUNNER_ID = "r1"


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "up", help="start nats-server, a supervisor and a runner; drive it to Ready on the default model"
    )
    p.add_argument("--runner-id", default=DEFAULT_RUNNER_ID, help="the runner's id (default %(default)s)")
    add_engine(p)
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="nats-server's client port on 127.0.0.1 (default %(default)s)"
    )
    p.add_argument(
        "--monitor-port",
        type=int,
        default=DEFAULT_MONITOR_PORT,
        help="nats-server's HTTP monitoring port (default %(default)s)",
    )
    p.add_argument("--store-dir", type=Path, default=None, help="JetStream store (default ~/.local/share/exo/nats)")
    p.add_argument(
        "--api-port",
        type=int,
        default=DEFAULT_API_PORT,
        help="the OpenAI-compatible API's port (default %(default)s; 0: no API)",
    )
    p.add_argument(
        "--api-host",
        default=DEFAULT_API_HOST,
        help="address the API listens on (default %(default)s; beyond loopback only with an API key or --allow-no-key)",
    )
    add_key_arguments(p)
    add_models_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        key = api_key_from_args(args, args.api_host, "--api-host") if args.api_port else None
    except (BadApiKeyFile, NoApiKey) as err:
        return fail(f"{type(err).__name__}: {err}")
    return up(
        UpOptions(
            models_dir=args.models_dir,
            port=args.port,
            monitor_port=args.monitor_port,
            runner_id=args.runner_id,
            store_dir=args.store_dir,
            api_port=args.api_port,
            engine=args.engine,
            api=ApiOptions(host=args.api_host, key=key, allow_no_key=args.allow_no_key),
        )
    )


@dataclass(frozen=True)
class ApiOptions:
    """Where `up`'s API listens and the key it requires (checked beforehand: cli/api_key.py)."""

    host: str = DEFAULT_API_HOST
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


@dataclass(frozen=True)
class UpOptions:
    """What `exojet up` starts: the server's ports and store, the runner, the API (`api_port` 0: none)."""

    models_dir: Path
    port: int = DEFAULT_PORT
    monitor_port: int = DEFAULT_MONITOR_PORT
    runner_id: str = DEFAULT_RUNNER_ID
    store_dir: Path | None = None
    api_port: int = DEFAULT_API_PORT
    engine: str = "auto"
    api: ApiOptions = ApiOptions()

    @property
    def logs(self) -> Path:
        return (self.store_dir or default_store_dir()).parent / "logs"


def up(opts: UpOptions) -> int:
    """Start everything (the API too, on `api_port` unless 0), drive the runner to Ready, serve until
    Ctrl-C, starting again whatever dies (up to the restart policy's bound)."""
    from exojet.models.smollm import DEFAULT_MODEL_ID, SmolLMNotInstalled, ensure_default_model

    started = time.perf_counter()
    # Started in the background by a script, we would inherit an ignored SIGINT;
    # SIGTERM (kill, a service manager) must clean up just like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        ensure_default_model(opts.models_dir)
    except SmolLMNotInstalled as err:
        return fail(str(err))
    try:
        server = NatsServer(
            port=opts.port,
            monitor_port=opts.monitor_port,
            store_dir=opts.store_dir,
            log_file=opts.logs / "nats-server.log",
            die_with_parent=True,
        ).start()
    except ServerError as err:
        return fail(f"{err} (is another `exojet up` or nats-server already running on port {opts.port}?)")
    print(f"nats-server  {server.url}  (store {server.store_dir})", flush=True)
    children: list[Child] = []
    serving = Serving()
    try:
        from_seq = asyncio.run(_ensure(server.url)) + 1
        children += _children(opts, server)
        print(f"supervisor, runner {opts.runner_id} started (logs in {opts.logs})", flush=True)
        say_ready = partial(_say_ready, opts, DEFAULT_MODEL_ID, started)
        watcher = Watcher(opts.runner_id)
        asyncio.run(_serve(server.url, children, watcher, DEFAULT_MODEL_ID, from_seq, serving, say_ready))
        return fail(f"runner {opts.runner_id} did not reach Ready; see {opts.logs}")
    except KeyboardInterrupt:
        print("\nstopping: the runner shuts down through the log, then the supervisor and the server", flush=True)
        return 0
    except (ChildKeepsDying, InstanceLost) as err:
        print(f"error: {err}; stopping everything (logs in {opts.logs})", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop_all(server, children, opts.runner_id, serving)


def _children(opts: UpOptions, server: NatsServer) -> list[Child]:
    """The server (started already), the supervisor, the runner and the API, each started again when it dies."""
    url, logs = server.url, opts.logs
    supervisor = ["supervisor", "--nats", url, "--models-dir", str(opts.models_dir)]
    runner = ["runner", "--id", opts.runner_id, "--nats", url, "--models-dir", str(opts.models_dir)]
    runner += ["--engine", opts.engine]
    children = [
        Child("nats-server", lambda: _start_again(server), DEFAULT_POLICY, server.process),
        Child("supervisor", lambda: _spawn(supervisor, logs / "supervisor.log"), DEFAULT_POLICY),
        Child("runner", lambda: _spawn(runner, logs / f"runner-{opts.runner_id}.log"), DEFAULT_POLICY),
    ]
    if opts.api_port:
        api_args, api_env = opts.api.child(url, opts.api_port)
        children.append(Child("api", lambda: _spawn(api_args, logs / "api.log", api_env), DEFAULT_POLICY))
    return children


def _say_ready(opts: UpOptions, model_id: str, started: float) -> None:
    api_lines = (
        f"OpenAI-compatible API: {opts.api.url(opts.api_port)}/v1\nLive page: {opts.api.url(opts.api_port)}/\n"
        if opts.api_port
        else ""
    )
    print(
        f"Ready in {time.perf_counter() - started:.1f} s: {model_id} on runner {opts.runner_id}.\n"
        f"{api_lines}"
        f'  exojet chat "What is the capital of France?"\n'
        f"  exojet state | exojet replay\nCtrl-C stops everything.",
        flush=True,
    )


def _stop_all(server: NatsServer, children: list[Child], runner_id: str, serving: Serving) -> None:
    """The runner shuts down through the log (bounded), then the others stop, the server last."""
    # A second Ctrl-C or kill must not cut the bounded cleanup short and orphan the children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runner_proc = next((c.proc for c in children if c.role == "runner"), None)
    if runner_proc is not None and runner_proc.poll() is None:
        try:
            asyncio.run(_shutdown_runner(server.url, runner_id, serving.instance_id))
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
