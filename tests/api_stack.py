"""A real stack for API tests: nats-server, a supervisor, runners with the tiny model placed, `exojet api`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

from exojet.bus import subjects
from exojet.bus.codec import decode_cancel, decode_event
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer, free_port
from testbed import REPO
from testbed.api_process import until_healthy
from tests.gguf_tiny import as_gguf
from tests.procs import exojet, start_runner, stop

API_KEY = "test-key"
MODEL = "local/tiny"


class ApiStack:
    """Everything an OpenAI client needs, as real processes; `close()` stops them all."""

    def __init__(
        self,
        root: Path,
        models_dir: Path,
        *,
        runners: tuple[str, ...] = ("r1",),
        max_queue: int = 64,
        heartbeat_timeout: float = 5.0,
        api_args: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.models_dir = models_dir
        self.server = NatsServer(port=0, monitor_port=0, store_dir=root / "nats", log_file=root / "nats.log").start()
        self.url = self.server.url
        asyncio.run(ensure_streams(self.url))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.procs["supervisor"] = exojet(
            "supervisor",
            "--nats",
            self.url,
            "--models-dir",
            str(models_dir),
            "--max-queue",
            str(max_queue),
            "--heartbeat-timeout",
            str(heartbeat_timeout),
            log=root / "supervisor.log",
        )
        for runner_id in runners:
            self.runner(runner_id)
        self.procs["api"] = exojet(
            "api",
            "--nats",
            self.url,
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
            "--liveness-timeout",
            str(heartbeat_timeout),
            *api_args,
            log=root / "api.log",
        )

    def runner(self, runner_id: str) -> subprocess.Popen[bytes]:
        proc = start_runner(runner_id, self.url, self.models_dir, self.root)
        self.procs[runner_id] = proc
        return proc

    def cli(self, *args: str, timeout: float = 120) -> str:
        """`exojet ARGS --nats URL` to completion; its stdout (fails on a non-zero exit)."""
        done = subprocess.run(
            [sys.executable, "-m", "exojet.cli.main", *args, "--nats", self.url],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def place(self, *args: str) -> str:
        """Place the tiny model (on `args`' runners) and wait for it to be Ready; its instance id."""
        return self.cli("place", MODEL, *args, "--wait", "--timeout", "90").strip()

    def wait_api(self, timeout: float = 30.0) -> None:
        until_healthy(f"http://127.0.0.1:{self.port}", self.procs["api"], self.root / "api.log", timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.server.stop()


async def ensure_streams(url: str) -> None:
    # Before anything publishes: a command sent before its stream exists is lost.
    nc = await client.connect(url, name="test")
    try:
        await stream_setup.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


def start_stack(root: Path, models_dir: Path, **options: object) -> ApiStack:
    """A stack with the tiny model Ready on its runners and the API answering."""
    stack = ApiStack(root, models_dir, **options)  # type: ignore[arg-type]
    try:
        stack.place("--runners", ",".join(r for r in stack.procs if r not in ("supervisor", "api")))
        stack.wait_api()
    except BaseException:
        stack.close()
        raise
    return stack


def start_gguf_stack(root: Path, tiny_model_dir: Path) -> ApiStack:
    """`start_stack` with the tiny model also as a GGUF, so its runner serves it on llama.cpp."""
    folder = root / "models" / "local--tiny"
    shutil.copytree(tiny_model_dir, folder)
    as_gguf(tiny_model_dir, folder / "model.gguf")
    return start_stack(root, root / "models")


async def task_statuses(url: str, runner_id: str, task_id: str) -> list[str]:
    """Every status the log holds for `task_id` (on `runner_id`'s subject), in order."""
    statuses: list[str] = []

    def on_event(env: Envelope) -> None:
        event = decode_event(env.data)
        if isinstance(event, TaskStatusUpdated) and event.task_id == task_id:
            statuses.append(f"{event.task_status}" + (f" {event.error_message}" if event.error_message else ""))

    nc = await client.connect(url, name="test")
    try:
        await client.replay_subject(nc, subjects.runner_events_subject(runner_id), on_event)
    finally:
        await nc.close()
    return statuses


async def cancels_in_log(url: str, runner_id: str) -> list[tuple[str, str]]:
    """(task_id, reason) of every CancelTask in the log for `runner_id`."""
    found: list[tuple[str, str]] = []

    def on_cancel(env: Envelope) -> None:
        cancel = decode_cancel(env.data)
        found.append((cancel.task_id, cancel.reason))

    nc = await client.connect(url, name="test")
    try:
        await client.replay_subject(nc, subjects.cancel_subject(runner_id), on_cancel)
    finally:
        await nc.close()
    return found
