"""Faults injected mid-workflow into real processes: nothing exits that the fault did
not kill, work in flight finishes, the instance serves again soon after the server's
return, every task has exactly one terminal status and `exojet replay --check` is clean.

The long matrix (60 s outages, every phase) is marked slow; the default suite runs
one representative of each kind of fault.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from exojet.bus.events import RunnerLost, RunnerRegistered, TaskStatusUpdated
from exojet.bus.statuses import TaskStatus
from tests.outage_harness import HEARTBEAT_TIMEOUT_S, Instance
from tests.procs import exojet_output
from tests.tcp_proxy import NatsProxy

pytestmark = pytest.mark.timeout(240)

# The bound: a chat is served again this soon after the server is back.
SERVE_AGAIN_S = 30.0
# Seconds of generation on the tiny model: the fault lands while it streams.
LONG_CHAT_TOKENS = 600


@pytest.fixture
async def instance(tmp_path: Path, models_dir: Path) -> AsyncIterator[Instance]:
    inst = await Instance(tmp_path, models_dir).start()
    yield inst
    await inst.close()


def _running(task_id: str | None = None, kind: str | None = None) -> Callable[[object], bool]:
    return lambda m: (
        isinstance(m, TaskStatusUpdated)
        and m.task_status == TaskStatus.RUNNING
        and (task_id is None or m.task_id == task_id)
        and (kind is None or m.task_type == kind)
    )


async def _outage(inst: Instance, kill: bool, down_s: float, phase: str) -> tuple[float, str | None]:
    """Take the server away during `phase` ("placement" or "chat"), bring it back after
    `down_s`; returns (seconds from its return to a chat answered, the chat in flight)."""
    in_flight = None
    await inst.place()
    if phase == "placement":
        await inst.watcher.wait_for(_running(kind="DownloadModel"), 30)
    else:
        await inst.ready()
        in_flight = await inst.chat(LONG_CHAT_TOKENS)
        await inst.first_chunk(in_flight)
    if kill:
        inst.server.kill()
    else:
        inst.server.stop()
    # The outage itself: nothing to wait for but the clock.
    await asyncio.sleep(down_s)
    inst.assert_alive()
    back = inst.restart_server()
    if phase == "placement":
        await inst.ready()
    served = await inst.chat_answered(timeout=SERVE_AGAIN_S)
    return served - back, in_flight


async def _assert_clean(inst: Instance, in_flight: str | None) -> None:
    inst.assert_alive()
    if in_flight is not None:
        await inst.assert_whole_answer(in_flight)
    inst.assert_one_terminal_status_each()
    assert not [m for _, m in inst.watcher.entries if isinstance(m, RunnerLost)]
    await inst.replay_check()


async def test_server_killed_mid_chat_and_restarted(instance: Instance) -> None:
    to_serve, in_flight = await _outage(instance, kill=True, down_s=2.0, phase="chat")
    print(f"\nserver SIGKILLed mid-chat, back after 2 s: served again {to_serve:.2f} s after its return")
    assert to_serve < SERVE_AGAIN_S
    await _assert_clean(instance, in_flight)
    # `exojet state` says who lost NATS, and for how long (the runner's part comes with its next heartbeat).
    deadline = time.monotonic() + 10
    while True:
        state = await exojet_output("state", "--nats", instance.url)
        rows = {
            (r[0], r[2]) for r in (line.split() for line in state.splitlines()) if r[:1] in (["supervisor"], ["runner"])
        }
        if rows == {("supervisor", "1"), ("runner", "1")}:
            break
        assert time.monotonic() < deadline, state


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("phase", ["placement", "chat"])
@pytest.mark.parametrize(("kill", "down_s"), [(False, 60.0), (True, 5.0)], ids=["stopped-60s", "sigkilled"])
async def test_server_outage_matrix(instance: Instance, kill: bool, down_s: float, phase: str) -> None:
    to_serve, in_flight = await _outage(instance, kill=kill, down_s=down_s, phase=phase)
    how = "SIGKILLed" if kill else "stopped"
    print(f"\nserver {how} {down_s:g} s during the {phase}: served again {to_serve:.2f} s after its return")
    assert to_serve < SERVE_AGAIN_S
    await _assert_clean(instance, in_flight)


# The chunks' case (same path, the other stream) runs in the slow step.
@pytest.mark.parametrize("stream", ["EXO_LOG", pytest.param("EXO_CHUNKS", marks=pytest.mark.slow)])
async def test_a_lost_ack_is_reconciled_not_taken_for_a_twin(tmp_path: Path, models_dir: Path, stream: str) -> None:
    proxy = NatsProxy()
    inst = await Instance(tmp_path, models_dir, runner_proxy=proxy).start()
    try:
        await inst.place()
        await inst.ready()
        before = inst.watcher.entries[-1][0].seq
        # The runner's next write to the stream is stored, its ack never reaches it.
        proxy.drop_next_ack(f'"stream":"{stream}","seq":'.encode())
        task_id = await inst.chat(16)
        await inst.assert_whole_answer(task_id)
        if stream == "EXO_CHUNKS":
            assert "published again after an outage" in inst.runner_log.read_text()
        assert proxy.acks_dropped == 1 and proxy.connections >= 2
        runner_events = inst.watcher.runner_events("r1", after_seq=before)
        # One incarnation throughout: the refused retry was recognised as our own write.
        assert not [e for e in runner_events if isinstance(e, RunnerRegistered | RunnerLost)]
        statuses = [e.task_status for e in runner_events if isinstance(e, TaskStatusUpdated) and e.task_id == task_id]
        assert statuses == [TaskStatus.RUNNING, TaskStatus.COMPLETE]
        await inst.chat_answered()
        await _assert_clean(inst, None)
    finally:
        await inst.close()


async def test_a_frozen_supervisor_declares_no_one_lost(instance: Instance) -> None:
    await instance.place()
    await instance.ready()
    assert instance.supervisor is not None
    instance.supervisor.send_signal(signal.SIGSTOP)
    # Frozen past the heartbeat timeout: only the clock can tell.
    await asyncio.sleep(HEARTBEAT_TIMEOUT_S * 2)
    instance.supervisor.send_signal(signal.SIGCONT)
    # It answers again, then a liveness check has run (its period is a fifth of the timeout).
    await instance.chat_answered()
    log = (instance.tmp_path / "supervisor.log").read_text()
    assert "stalled" in log
    await _assert_clean(instance, None)


async def test_an_engine_dies_with_its_sigkilled_runner_mid_prompt(instance: Instance) -> None:
    await instance.place()
    await instance.ready()
    assert instance.runner is not None
    runner = psutil.Process(instance.runner.pid)
    task_id = await instance.chat(LONG_CHAT_TOKENS)
    await instance.watcher.wait_for(_running(task_id), 30)
    engines = runner.children()
    assert engines, "the runner has no engine process"
    instance.runner.kill()
    killed = time.monotonic()
    # Dead means gone or a zombie (it holds no memory; reaping is its new parent's business).
    while any(_alive(engine) for engine in engines):
        assert time.monotonic() - killed < 1.0, f"engine alive 1 s after its runner was SIGKILLed: {engines}"
        await asyncio.sleep(0.02)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_stop_signal_while_nats_is_away_still_stops_runner_and_supervisor(instance: Instance) -> None:
    await instance.place()
    await instance.ready()
    instance.server.stop()
    assert instance.runner is not None and instance.supervisor is not None
    for proc in (instance.runner, instance.supervisor):
        proc.send_signal(signal.SIGTERM)
    # Their last words wait for NATS a bounded time, then they exit all the same.
    codes = [
        await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) for proc in (instance.runner, instance.supervisor)
    ]
    assert codes == [0, 0]
    instance.restart_server()  # for the fixture's own connection to close cleanly
