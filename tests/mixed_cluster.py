"""A cluster of exojet 0.1.0 and this version's processes side by side, on one real nats-server.

Each process is started as `old` (tests/old_version.py's venv) or `new` (this checkout), stopped
by SIGTERM like any service manager would, and replaced under the same name by the other version.
Chats go through the official openai client to whichever API is up; `ChatLoad` keeps a stream of
them going and records each one's fate, so a test can say that no chat an API accepted failed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import openai

from exojet.bus.events import TaskStatusUpdated
from exojet.bus.ops.server import NatsServer, free_port
from exojet.bus.statuses import TERMINAL_TASK_STATUSES
from testbed.api_process import until_healthy
from testbed.log_watcher import LogWatcher
from tests.api_stack import API_KEY, MODEL
from tests.old_version import old_python
from tests.procs import group_ports, stop

Version = Literal["old", "new"]
# Generous: the machine is shared, and a runner declared lost in a rolling upgrade is another test.
HEARTBEAT_TIMEOUT_S = 15


@dataclass
class Proc:
    name: str
    version: Version
    popen: subprocess.Popen[bytes]
    port: int | None = None
    # SIGTERM sent: no new chat is sent to it.
    stopping: bool = False


class MixedCluster:
    """Real processes of either version on one nats-server; `close()` stops them all."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.root, self.models_dir = root, models_dir
        self.server = NatsServer(port=0, monitor_port=0, store_dir=root / "nats", log_file=root / "nats.log").start()
        self.url = self.server.url
        self.old: str | None = None
        self.group_ports = group_ports()
        self.procs: dict[str, Proc] = {}

    def _python(self, version: Version) -> str:
        if version == "new":
            return sys.executable
        if self.old is None:
            self.old = str(old_python())
        return self.old

    def _spawn(self, name: str, version: Version, *args: str) -> Proc:
        assert name not in self.procs or self.procs[name].popen.poll() is not None, f"{name} is running"
        log = open(self.root / f"{name}.log", "ab")
        log.write(f"--- exojet {version} {' '.join(args)}\n".encode())
        log.flush()
        # Not from this checkout's directory: the old venv must import only its own exojet.
        popen = subprocess.Popen(
            [self._python(version), "-m", "exojet.cli.main", *args],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        proc = self.procs[name] = Proc(name, version, popen)
        return proc

    def supervisor(self, name: str, version: Version) -> Proc:
        return self._spawn(
            name,
            version,
            "supervisor",
            "--nats",
            self.url,
            "--id",
            name,
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT_S),
            "--group-ports",
            self.group_ports,
            "--models-dir",
            str(self.models_dir),
        )

    def runner(self, runner_id: str, version: Version) -> Proc:
        # 0.1.0 has MLX only (llama.cpp was an extra, not installed); this version takes the GGUF beside it.
        engine = "mlx" if version == "old" else "llamacpp"
        return self._spawn(
            runner_id,
            version,
            "runner",
            "--id",
            runner_id,
            "--nats",
            self.url,
            "--models-dir",
            str(self.models_dir),
            "--engine",
            engine,
        )

    def api(self, name: str, version: Version, port: int | None = None) -> Proc:
        port = port or free_port()
        args = (
            "api",
            "--nats",
            self.url,
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--liveness-timeout",
            str(HEARTBEAT_TIMEOUT_S),
        )
        proc = self._spawn(name, version, *args)
        until_healthy(f"http://127.0.0.1:{port}", proc.popen, self.root / f"{name}.log", 180)
        proc.port = port  # chats go to it from now on
        return proc

    def run(self, version: Version, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`exojet ARGS --nats URL` of `version` to completion (bounded), its output captured."""
        return subprocess.run(
            [self._python(version), "-m", "exojet.cli.main", *args, "--nats", self.url],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(self, version: Version, *args: str, timeout: float = 180) -> str:
        """`run`'s stdout (failing the test on a non-zero exit)."""
        done = self.run(version, *args, timeout=timeout)
        assert done.returncode == 0, f"exojet {version} {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    async def cli_async(self, version: Version, *args: str, timeout: float = 180) -> str:
        """`cli` off the event loop (the test's chats go on meanwhile)."""
        return await asyncio.to_thread(self.cli, version, *args, timeout=timeout)

    def stop(self, name: str) -> int:
        """SIGTERM (SIGKILL past 60 s); its exit code."""
        self.procs[name].stopping = True
        return stop(self.procs[name].popen, timeout=60)

    async def stop_async(self, name: str) -> int:
        """`stop` off the event loop (the test's chats go on meanwhile)."""
        return await asyncio.to_thread(self.stop, name)

    def api_urls(self) -> list[str]:
        return [
            f"http://127.0.0.1:{p.port}/v1"
            for p in self.procs.values()
            if p.port is not None and not p.stopping and p.popen.poll() is None
        ]

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc.popen)
        self.server.stop()


@dataclass
class ChatOutcome:
    api: str
    accepted: bool
    text: str = ""
    error: str | None = None


async def one_chat(
    base_url: str, prompt: str, max_tokens: int = 64, accepted: asyncio.Event | None = None
) -> ChatOutcome:
    """A streamed chat through the official client: accepted once its first piece came."""
    api = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    outcome = ChatOutcome(base_url, accepted=False)
    try:
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
        )
        outcome.accepted = True
        if accepted is not None:
            accepted.set()
        finish = None
        async for part in stream:
            for choice in part.choices:
                outcome.text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        if finish is None:
            outcome.error = "the stream ended without a finish_reason"
    except (openai.APIError, OSError) as err:
        outcome.error = f"{type(err).__name__}: {err}"
    finally:
        await api.close()
    return outcome


@dataclass
class ChatLoad:
    """`workers` chats at a time, each to the next API that is up, until `stop()`."""

    cluster: MixedCluster
    workers: int = 3
    outcomes: list[ChatOutcome] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> ChatLoad:
        counter = itertools.count()
        self._tasks = [asyncio.ensure_future(self._worker(counter)) for _ in range(self.workers)]
        return self

    async def _worker(self, counter: itertools.count[int]) -> None:
        while not self._stopping.is_set():
            n = next(counter)
            urls = self.cluster.api_urls()
            outcome = await one_chat(urls[n % len(urls)], f"story number {n}")
            self.outcomes.append(outcome)
            self._ended.set()

    def completed(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None)

    async def served(self, count: int, timeout: float) -> None:
        """Until `count` more chats completed (bounded)."""
        target = self.completed() + count
        async with asyncio.timeout(timeout):
            while self.completed() < target:
                self._ended.clear()
                await self._ended.wait()

    async def stop(self) -> list[ChatOutcome]:
        self._stopping.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 180)
        return self.outcomes


def terminal_counts(watcher: LogWatcher) -> dict[str, int]:
    """Task id -> how many terminal statuses the log holds for it (0 for a task without one)."""
    counts = {
        m.task_id: 0
        for env, m in watcher.entries
        if env.subject.startswith("exo.tasks.") and getattr(m, "task_id", None) is not None
    }
    for _, m in watcher.entries:
        if isinstance(m, TaskStatusUpdated) and m.task_status in TERMINAL_TASK_STATUSES:
            counts[m.task_id] = counts.get(m.task_id, 0) + 1
    return counts
