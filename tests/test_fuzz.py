"""Generated bad input, sent as an attacker would, to a live runner and a live supervisor.

Random JSON, wrong types, huge strings, deep nesting, invalid UTF-8, unknown types,
oversized messages and valid tasks in the wrong state go to `exo.tasks.r1`; the same
kinds go to `exo.commands`. Each task gets its terminal status with a named error
(valid chats, capped at a few tokens, complete), each bad command a named `BadCommand`
anomaly in the supervisor's projection, nothing crashes, the processes' memory stays
flat, and a valid chat still runs at the end. The default suite sends 150 to each;
`EXOJET_FUZZ_FULL=1 pytest -m slow tests/test_fuzz.py` sends 10,000 to each.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_command, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.query_client import first_answer
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import Shutdown, UnloadModel
from testbed.log_watcher import LogWatcher
from tests.procs import exojet, stop
from tests.runner_harness import chat, ready_on_small_window, start_runner

# Every error a task may be answered with: the codec's, the state machine's, the engine's refusals.
NAMED_TASK_ERRORS = {
    "NotJson",
    "UnknownType",
    "MissingType",
    "MissingField",
    "NotAnObject",
    "InvalidField",
    "PayloadTooLarge",
    "TooDeeplyNested",
    "InvalidModelId",
    "InvalidState",
    "ContextLengthExceeded",
    "InvalidRequest",
}
NAMED_COMMAND_ERRORS = NAMED_TASK_ERRORS - {"InvalidState", "ContextLengthExceeded", "InvalidRequest"}
# RSS a process may gain once warm (see Target.warm_after).
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
TASK_TYPES = [
    "DownloadModel",
    "ConnectToGroup",
    "LoadModel",
    "StartWarmup",
    "ChatCompletion",
    "Nope",
    "",
    "chatcompletion",
]
COMMAND_TYPES = ["PlaceInstance", "DeleteInstance", "ChatCompletion", "Nope", ""]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def _typed(types: list[str]) -> st.SearchStrategy[bytes]:
    """An object with a `type` (known or not) and fields of any JSON type."""
    fields = st.dictionaries(
        st.sampled_from(
            [
                "shard",
                "group",
                "messages",
                "max_tokens",
                "temperature",
                "top_p",
                "seed",
                "stop",
                "model_id",
                "runners",
                "instance_id",
                "min_runners",
                "emit_rank",
                "stream_id",
            ]
        ),
        json_values,
        max_size=5,
    )
    return st.builds(lambda t, f: msgspec.json.encode({**f, "type": t}), st.sampled_from(types), fields)


def _huge_string() -> st.SearchStrategy[bytes]:
    # Sizes are drawn, the text is made: hypothesis' own buffer could not hold it.
    return st.integers(100_000, 1_000_000).map(
        lambda n: msgspec.json.encode(
            {"type": "ChatCompletion", "messages": [{"role": "user", "content": "ab " * (n // 3)}], "max_tokens": 4}
        )
    )


deep_nesting = st.integers(10, 20_000).map(lambda d: b'{"type":"StartWarmup","x":' + b"[" * d + b"]" * d + b"}")
invalid_utf8 = st.binary(min_size=1, max_size=64).map(lambda b: b'{"type":"' + b + b'\xff\xfe"}')
oversized = st.integers(1024 * 1024 + 1, 3 * 1024 * 1024).map(
    lambda n: b'{"type":"StartWarmup","pad":"' + b"a" * n + b'"}'
)
# Valid in another status than Ready: each is refused InvalidState (and names what it needs).
wrong_state = st.sampled_from(
    [
        {"type": "DownloadModel", "shard": {"model_id": "local/tiny"}},
        {"type": "LoadModel", "shard": {"model_id": "local/tiny"}},
        {"type": "StartWarmup"},
        {"type": "ConnectToGroup", "group": {"group_id": "g", "world_size": 2, "rank": 0, "hosts": ["a:1", "b:2"]}},
    ]
).map(msgspec.json.encode)
valid_chats = st.builds(
    lambda text, n, t: msgspec.json.encode(
        {"type": "ChatCompletion", "messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": t}
    ),
    st.text(max_size=200),
    st.integers(1, 4),
    st.floats(0, 2),
)

task_payloads = st.one_of(
    json_values.map(msgspec.json.encode),
    _typed(TASK_TYPES),
    _huge_string(),
    deep_nesting,
    invalid_utf8,
    oversized,
    wrong_state,
    valid_chats,
    st.binary(max_size=64),
)
command_payloads = st.one_of(
    json_values.map(msgspec.json.encode),
    _typed(COMMAND_TYPES),
    deep_nesting,
    invalid_utf8,
    oversized,
    st.binary(max_size=64),
)


def _ends_the_runner(payload: bytes) -> bool:
    """A valid Shutdown or UnloadModel does what it says; the fuzz must not send one."""
    try:
        return isinstance(decode_task(payload), (Shutdown, UnloadModel))
    except BadInput:
        return False


def _is_bad_command(payload: bytes) -> bool:
    try:
        decode_command(payload)
    except BadInput:
        return True
    return False


def _rss(role: str, pid: int) -> dict[str, int]:
    """RSS of the process and of its children (the runner's engine child)."""
    process = psutil.Process(pid)
    rss = {role: process.memory_info().rss}
    for child in process.children(recursive=True):
        rss[f"{role}'s {child.cmdline()[-1].rsplit('.', 1)[-1]}"] = child.memory_info().rss
    return rss


class Target:
    """The live runner and supervisor, and what was sent to them."""

    def __init__(self, nc: NATS, runner_pid: int, supervisor_pid: int) -> None:
        self.nc, self.js = nc, nc.jetstream()
        # Only the runner's terminal statuses are kept: a LogWatcher would hold every
        # payload sent (megabytes each) for the whole run.
        self.answers: asyncio.Queue[tuple[int, TaskStatusUpdated]] = asyncio.Queue()
        self.pids = {"runner": runner_pid, "supervisor": supervisor_pid}
        self.rss = {"before": self._rss()}
        self.sent = {"tasks": 0, "commands": 0}
        self.anomalies = 0
        # RSS is compared from here on: the first payloads warm caches and allocator arenas
        # (a 1 MiB prompt's tokens, MLX buffers) that later ones reuse; a leak keeps growing.
        self.warm_after = 0

    async def start(self) -> Target:
        last = await client.last_seq(self.js)
        self._sub = await client.follow(
            self.nc, self._on_event, start_seq=last + 1, subject=subjects.runner_events_subject("r1")
        )
        return self

    def _on_event(self, env: Envelope) -> None:
        event = decode_event(env.data)
        if isinstance(event, TaskStatusUpdated) and event.task_status != TaskStatus.RUNNING:
            self.answers.put_nowait((env.seq, event))

    def _rss(self) -> dict[str, int]:
        return {name: rss for role, pid in self.pids.items() for name, rss in _rss(role, pid).items()}

    def _count(self, kind: str) -> None:
        self.sent[kind] += 1
        if sum(self.sent.values()) == self.warm_after:
            self.rss["warm"] = self._rss()

    async def task(self, payload: bytes) -> None:
        ack = await self.js.publish(subjects.task_subject("r1"), payload, timeout=10)
        self._count("tasks")
        # The runner answers its tasks in order, each with one terminal status.
        seq, event = await asyncio.wait_for(self.answers.get(), 60)
        assert seq > ack.seq and self.answers.empty(), (payload[:200], event)
        if event.task_status == TaskStatus.COMPLETE:
            assert json.loads(payload)["type"] == "ChatCompletion", (payload[:200], event)
        else:
            assert event.task_status == TaskStatus.FAILED, (payload[:200], event)
            assert event.error_type in NAMED_TASK_ERRORS, (payload[:200], event)

    async def command(self, payload: bytes) -> None:
        ack = await self.js.publish(subjects.COMMANDS, payload, timeout=10)
        self._count("commands")
        state = await first_answer(self.nc, timeout=30, min_seq=ack.seq)
        assert state.anomaly_count == self.anomalies + 1, payload[:200]
        self.anomalies = state.anomaly_count
        [newest] = [a for a in state.anomalies if a.seq == ack.seq]
        assert newest.kind == "BadCommand" and newest.detail.split(":")[0] in NAMED_COMMAND_ERRORS, newest


@pytest.fixture
async def target(
    nats_server: NatsServer, nc: NATS, models_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Target]:
    watcher = await LogWatcher().start(nc)
    runner = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    supervisor = exojet(
        "supervisor", "--nats", nats_server.url, "--models-dir", str(models_dir), log=tmp_path / "s.log"
    )
    try:
        await ready_on_small_window(nc, watcher, models_dir)
        await first_answer(nc, timeout=30)
        await watcher.stop()
        t = await Target(nc, runner.proc.pid, supervisor.pid).start()
        t.anomalies = (await first_answer(nc)).anomaly_count
        t.warm_after = request.node.get_closest_marker("warm").args[0]
        yield t
        # Still serving: a valid chat after everything runs, and both processes live.
        ack = await client.publish(t.js, subjects.task_subject("r1"), {**chat(4), "task_id": "after"})
        seq, done = await asyncio.wait_for(t.answers.get(), 60)
        assert seq > ack.seq and done.task_id == "after" and done.task_status == TaskStatus.COMPLETE, done
        assert runner.proc.poll() is None and supervisor.poll() is None
        t.rss["after"] = t._rss()
        print(f"\nsent {t.sent}; RSS in MiB before / after {t.warm_after} payloads / after all:")
        for name in t.rss["after"]:
            print(f"  {name}: " + " / ".join(f"{t.rss[when].get(name, 0) / 2**20:.1f}" for when in t.rss))
        for name, after in t.rss["after"].items():
            assert after - t.rss["warm"][name] < RSS_GROWTH_LIMIT, (name, t.rss)
    finally:
        stop(supervisor)
        stop(runner.proc)


def _fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SAMPLE = 150
FULL = 10_000
# 10,000 payloads take about 40 minutes for the runner on two busy cores (a few tasks a
# second: each is a fenced, fsynced write), past what CI gives the slow run.
full_run = pytest.mark.skipif(
    not os.environ.get("EXOJET_FUZZ_FULL"), reason="set EXOJET_FUZZ_FULL=1 to send 10,000 payloads to each"
)
safe_tasks = task_payloads.filter(lambda p: not _ends_the_runner(p))
bad_commands = command_payloads.filter(_is_bad_command)


def _fuzzed(examples: int, payloads: Any) -> Any:
    """A test given `examples` generated payloads, on a target warmed for a third of them
    (at most 1,000), within a bound that grows with them."""

    def apply(test: Any) -> Any:
        test = given(payload=payloads)(test)
        test = _fuzz(examples)(test)
        test = pytest.mark.warm(min(examples // 3, 1000))(test)
        return pytest.mark.timeout(600 if examples <= SAMPLE else 3 * 3600)(test)

    return apply


@_fuzzed(SAMPLE, safe_tasks)
async def test_generated_tasks_each_get_a_named_answer_and_the_runner_serves_on(target: Target, payload: bytes) -> None:
    await target.task(payload)


@_fuzzed(SAMPLE, bad_commands)
async def test_generated_bad_commands_each_become_a_named_anomaly(target: Target, payload: bytes) -> None:
    await target.command(payload)


@pytest.mark.slow
@full_run
@_fuzzed(FULL, safe_tasks)
async def test_ten_thousand_generated_tasks(target: Target, payload: bytes) -> None:
    await target.task(payload)


@pytest.mark.slow
@full_run
@_fuzzed(FULL, bad_commands)
async def test_ten_thousand_generated_bad_commands(target: Target, payload: bytes) -> None:
    await target.command(payload)
