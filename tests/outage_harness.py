"""One instance of exojet (a nats-server on a fixed port and store, a supervisor, a
runner serving the tiny model) and the faults the outage tests inject into it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus import streams, subjects
from exojet.bus.commands import PlaceInstance, RouteChatCompletion
from exojet.bus.events import RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ids import chat_id_of, chat_task_id, instance_id_of
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TaskStatus, status_name
from exojet.bus.tasks import ChatMessage
from testbed.log_watcher import LogWatcher
from tests.procs import exojet, exojet_output, stop
from tests.runner_harness import PROMPT, TINY, start_runner
from tests.tcp_proxy import NatsProxy

HEARTBEAT_TIMEOUT_S = 3.0


def _chunk_subject(task_id: str) -> str:
    """A routed chat's chunks go to its chat id, the task id without its rank."""
    return subjects.chunks_filter(task_id.rsplit(".", 1)[0])


class Instance:
    """Started by `start()`, stopped by `close()`; `nc` and `watcher` are the test's own view."""

    def __init__(self, tmp_path: Path, models_dir: Path, runner_proxy: NatsProxy | None = None) -> None:
        self.tmp_path = tmp_path
        self.models_dir = models_dir
        self.store = tmp_path / "nats"
        self.server = NatsServer(port=0, monitor_port=0, store_dir=self.store, log_file=tmp_path / "nats.log")
        # The runner may reach the server through a proxy.
        self.runner_proxy = runner_proxy
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.runner: subprocess.Popen[bytes] | None = None
        self.runner_log = tmp_path / "runner.log"
        self.nc: NATS
        self.watcher = LogWatcher()

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> Instance:
        self.server.start()
        self.nc = await client.connect(self.url, name="test")
        await stream_setup.ensure_streams(self.nc.jetstream())
        await self.watcher.start(self.nc)
        self.supervisor = exojet(
            "supervisor",
            "--nats",
            self.url,
            "--models-dir",
            str(self.models_dir),
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT_S),
            log=self.tmp_path / "supervisor.log",
        )
        runner_url = self.url
        if self.runner_proxy is not None:
            self.runner_proxy.target_port = self.server.port
            runner_url = await self.runner_proxy.start()
        handle = await start_runner(runner_url, self.models_dir, self.watcher, self.tmp_path)
        self.runner = handle.proc
        self.runner_log = handle.log
        return self

    async def close(self) -> None:
        for proc in (self.runner, self.supervisor):
            if proc is not None:
                proc.send_signal(signal.SIGCONT)
                stop(proc)
        await self.watcher.stop()
        await self.nc.close()
        if self.runner_proxy is not None:
            self.runner_proxy.close()
        self.server.stop()

    # -- faults ---------------------------------------------------------------

    def restart_server(self) -> float:
        """Start the server again on the same port and store; returns when it serves (monotonic)."""
        self.server = NatsServer(
            port=self.server.port, monitor_port=0, store_dir=self.store, log_file=self.tmp_path / "nats.log"
        ).start()
        return time.monotonic()

    def assert_alive(self) -> None:
        for name, proc in (("supervisor", self.supervisor), ("runner", self.runner)):
            assert proc is not None and proc.poll() is None, f"the {name} exited ({proc and proc.returncode})"

    # -- work -----------------------------------------------------------------

    async def place(self) -> str:
        command_id = f"p-{uuid.uuid4().hex[:8]}"
        await client.publish_until_stored(
            self.nc.jetstream(),
            subjects.COMMANDS,
            PlaceInstance(command_id=command_id, model_id=TINY, runners=("r1",)),
            msg_id=command_id,
        )
        return instance_id_of(command_id, 0)

    async def chat(self, max_tokens: int) -> str:
        """Route a chat to the instance; returns the id of the task that serves it."""
        command_id = f"c-{uuid.uuid4().hex[:8]}"
        await client.publish_until_stored(
            self.nc.jetstream(),
            subjects.COMMANDS,
            RouteChatCompletion(command_id=command_id, messages=(ChatMessage("user", PROMPT),), max_tokens=max_tokens),
            msg_id=command_id,
        )
        return chat_task_id(chat_id_of(command_id, 0), 0)

    async def ready(self, timeout: float = 60.0) -> None:
        """The runner (the instance's only placement) reports Ready."""
        await self.watcher.wait_for(
            lambda m: isinstance(m, RunnerStatusUpdated) and status_name(m.runner_status) == "RunnerReady", timeout
        )

    async def chat_answered(self, max_tokens: int = 8, timeout: float = 30.0) -> float:
        """A chat routed now completes; returns when (monotonic)."""
        done = await self.watcher.task_done(await self.chat(max_tokens), timeout)
        assert done.task_status == TaskStatus.COMPLETE, done
        return time.monotonic()

    async def first_chunk(self, task_id: str, timeout: float = 30.0) -> None:
        """Until the routed chat served by `task_id` has streamed its first chunk."""
        arrived = asyncio.Event()
        follower = await client.follow(
            self.nc, lambda env: arrived.set(), subject=_chunk_subject(task_id), stream=streams.CHUNKS_STREAM
        )
        try:
            await asyncio.wait_for(arrived.wait(), timeout)
        finally:
            await follower.stop()

    async def chunks_of(self, task_id: str) -> list[dict[str, object]]:
        """The chunks EXO_CHUNKS holds for a routed chat's task, in stream order."""
        chunks: list[dict[str, object]] = []
        await client.replay_subject(
            self.nc,
            _chunk_subject(task_id),
            lambda env: chunks.append(msgspec.json.decode(env.data)),
            stream=streams.CHUNKS_STREAM,
        )
        return chunks

    async def assert_whole_answer(self, task_id: str) -> None:
        """Every chunk stored once, indexes without gaps, ending `done`, and they spell the result."""
        done = await self.watcher.task_done(task_id, 120)
        assert isinstance(done, TaskStatusUpdated) and done.task_status == TaskStatus.COMPLETE, done
        chunks = await self.chunks_of(task_id)
        assert [c["index"] for c in chunks] == list(range(len(chunks))), [c["index"] for c in chunks]
        assert chunks[-1].get("done") is True
        assert done.result is not None
        assert "".join(str(c["text"]) for c in chunks) == done.result["text"]

    def assert_one_terminal_status_each(self) -> None:
        terminal: dict[str, int] = {}
        for _, message in self.watcher.entries:
            if isinstance(message, TaskStatusUpdated) and message.task_status not in (TaskStatus.RUNNING,):
                terminal[message.task_id] = terminal.get(message.task_id, 0) + 1
        assert {t: n for t, n in terminal.items() if n != 1} == {}

    async def replay_check(self) -> str:
        """`exojet replay --check`: its report, asserting it found nothing."""
        return await exojet_output("replay", "--check", "--nats", self.url)
