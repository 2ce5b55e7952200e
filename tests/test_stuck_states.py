"""The five stuck states users of exo report, provoked live against real processes.

Each test records the log, asserts that `exojet explain` names the cause in one line (and
`exojet replay --check` flags what it should), and that the system itself ends correct.
exo issues: #1591 stuck WarmingUp after a runner crash, #1731 stuck Loaded, #2219 a failure
event rejected so the instance sits Loading, #2120 a dead runner behind a live instance,
#1934 placement churn deadlock.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.codec import decode_event
from exojet.bus.commands import DeleteInstance
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.nats import client
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import RunnerLoaded, RunnerWarmingUp, TaskStatus
from exojet.projections.explain import explain
from testbed import REPO
from testbed.log_watcher import LogWatch
from tests.cluster_procs import Procs, instance_in, place_instance, runners_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
HEARTBEAT_TIMEOUT = 2.0


@pytest.fixture
async def cluster(
    nats_server: NatsServer, models_dir: Path, tmp_path: Path, nc: NATS
) -> AsyncIterator[tuple[Procs, LogWatch]]:
    watch = LogWatch()
    await watch.start(nc)
    procs = Procs(nats_server.url, models_dir, tmp_path, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    procs.runner("r1")
    await watch.until(runners_idle("r1"), 60, "r1 Idle")
    procs.supervisor()
    yield procs, watch
    for proc in procs.runners.values():
        _kill_tree(proc.pid, signal.SIGCONT)
    procs.stop_all()


def _engine(runner_pid: int) -> psutil.Process:
    [engine] = [p for p in psutil.Process(runner_pid).children() if "engine_child" in " ".join(p.cmdline())]
    return engine


def _kill_tree(pid: int, sig: int) -> None:
    try:
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


async def _exojet(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exojet.cli.main", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _cause(url: str, target_id: str) -> str:
    code, out = await _exojet("explain", target_id, "--nats", url)
    assert code == 0, out
    last = out.splitlines()[-1]
    assert last.startswith("cause: "), out
    return last.removeprefix("cause: ")


def _is_status(runner_id: str, status_type: type) -> Callable[[Envelope], bool]:
    def match(env: Envelope) -> bool:
        if env.subject != subjects.runner_events_subject(runner_id):
            return False
        event = decode_event(env.data)
        return isinstance(event, RunnerStatusUpdated) and isinstance(event.runner_status, status_type)

    return match


async def test_1591_engine_killed_during_warmup(cluster: tuple[Procs, LogWatch], nc: NATS) -> None:
    procs, watch = cluster
    runner = procs.runners["r1"]

    def freeze_then_kill(env: Envelope) -> None:
        # Frozen once loaded, so the warmup request is still in the engine when it is killed.
        if _is_status("r1", RunnerLoaded)(env):
            _engine(runner.pid).send_signal(signal.SIGSTOP)
        elif _is_status("r1", RunnerWarmingUp)(env):
            _engine(runner.pid).send_signal(signal.SIGKILL)

    watch.hooks.append(freeze_then_kill)
    instance_id = await place_instance(nc, model_id="local/tiny", runners=("r1",))
    warmup = f"{instance_id}.a1.warmup.r1"
    await watch.until(
        lambda s: warmup in s.tasks and s.tasks[warmup].status == TaskStatus.FAILED, 60, "the warmup failed"
    )
    watch.hooks.remove(freeze_then_kill)
    cause = await _cause(procs.url, warmup)
    assert cause.startswith(f"task {warmup} (StartWarmup on r1) is Failed since seq")
    assert "SIGKILL" in cause
    # The system does not sit in WarmingUp: the instance is failed (and retried), the runner out of WarmingUp.
    state = await watch.until(
        lambda s: s.instances[instance_id].attempt >= 2 or s.instances[instance_id].status == "Failed",
        30,
        f"{instance_id} failed or retried",
    )
    assert state.runners["r1"].status != "RunnerWarmingUp"
    assert "SIGKILL" in (state.instances[instance_id].reason or "")


async def test_1731_runner_frozen_after_loaded(cluster: tuple[Procs, LogWatch], nc: NATS) -> None:
    procs, watch = cluster
    runner = procs.runners["r1"]

    def freeze(env: Envelope) -> None:
        if _is_status("r1", RunnerLoaded)(env):
            _kill_tree(runner.pid, signal.SIGSTOP)

    watch.hooks.append(freeze)
    instance_id = await place_instance(nc, model_id="local/tiny", runners=("r1",))
    await watch.until(lambda s: s.runners["r1"].status == "RunnerLost", 60, "r1 declared lost")
    watch.hooks.remove(freeze)
    cause = await _cause(procs.url, "r1")
    assert cause.startswith("r1 was declared lost since seq") and "heartbeat" in cause
    inst_cause = await _cause(procs.url, instance_id)
    assert instance_id in inst_cause and "r1" in inst_cause and "Lost" in inst_cause
    # The supervisor did not leave the instance waiting on a frozen runner: that attempt failed.
    inst = watch.state.instances[instance_id]
    assert inst.status in ("Placing", "Failed") and "r1" in (inst.reason or "")
    # Thawed, the runner finds its writes fenced, comes back as a new incarnation and serves the
    # instance's next attempt: it does not die on the writes it had in flight when it froze.
    lost_incarnation = watch.state.runners["r1"].incarnation
    _kill_tree(runner.pid, signal.SIGCONT)
    await watch.until(lambda s: s.runners["r1"].incarnation > lost_incarnation, 60, "r1 registered again")
    await watch.until(instance_in(instance_id, "Ready"), 90, f"{instance_id} Ready on the thawed r1")
    assert runner.poll() is None, "the thawed runner exited"


async def test_2219_failure_event_that_does_not_validate(cluster: tuple[Procs, LogWatch], nc: NATS) -> None:
    procs, watch = cluster
    instance_id = await place_instance(nc, model_id="local/tiny", runners=("r1",))
    await watch.until(instance_in(instance_id, "Ready"), 60, f"{instance_id} Ready")
    # A failure report in a shape the contract refuses (error_message must be a string).
    bad = (
        b'{"type":"RunnerStatusUpdated","event_id":"bad-1","runner_id":"r1","incarnation":1,'
        b'"runner_status":{"type":"RunnerFailed","error_message":5}}'
    )
    ack = await client.publish(nc.jetstream(), subjects.runner_events_subject("r1"), bad)
    await watch.until(lambda s: s.seq >= ack.seq, 10, "the bad event folded")
    code, out = await _exojet("replay", "--check", "--nats", procs.url)
    assert code == 1
    assert f"anomaly at seq {ack.seq}: BadEvent:" in out
    cause = await _cause(procs.url, "r1")
    assert cause.startswith("r1 is RunnerReady since seq")
    assert cause.endswith(f"the message at seq {ack.seq} that would have changed it was refused")
    # The refused event changed nothing: the instance serves.
    assert watch.state.instances[instance_id].status == "Ready" and watch.state.runners["r1"].status == "RunnerReady"


async def test_2120_runner_killed_behind_a_ready_instance(cluster: tuple[Procs, LogWatch], nc: NATS) -> None:
    procs, watch = cluster
    instance_id = await place_instance(nc, model_id="local/tiny", runners=("r1",))
    await watch.until(instance_in(instance_id, "Ready"), 60, f"{instance_id} Ready")
    # Killed before the supervisor notices: the log still says Ready; explain says who cannot serve.
    _kill_tree(procs.runners["r1"].pid, signal.SIGKILL)
    ready_log = list(watch.envs)
    assert explain(ready_log, instance_id).cause.startswith(f"{instance_id} (local/tiny) is Ready since seq")
    await watch.until(lambda s: s.runners["r1"].status == "RunnerLost", 30, "r1 declared lost")
    await watch.until(lambda s: s.instances[instance_id].status != "Ready", 30, f"{instance_id} no longer Ready")
    cause = await _cause(procs.url, instance_id)
    assert instance_id in cause and "r1" in cause, cause
    assert (await _cause(procs.url, "r1")).startswith("r1 was declared lost since seq")
    assert watch.state.instances[instance_id].status in ("Placing", "Failed")


async def test_1934_place_and_delete_in_a_tight_loop(cluster: tuple[Procs, LogWatch], nc: NATS) -> None:
    procs, watch = cluster
    js = nc.jetstream()
    placed = []
    for _ in range(8):
        instance_id = await place_instance(nc, model_id="local/tiny", runners=("r1",))
        await client.publish(js, subjects.COMMANDS, DeleteInstance(instance_id=instance_id))
        placed.append(instance_id)
    last = await place_instance(nc, model_id="local/tiny", runners=("r1",))
    # No deadlock: every churned instance ends Deleted, the last one is served.
    await watch.until(
        lambda s: all(s.instances[i].status == "Deleted" for i in placed) and instance_in(last, "Ready")(s),
        120,
        "the churned instances Deleted and the last Ready",
    )
    assert (await _cause(procs.url, placed[0])).startswith(f"{placed[0]} (local/tiny) is Deleted at attempt")
    assert (await _cause(procs.url, last)) == (
        f"{last} (local/tiny) is Ready since seq {watch.state.instances[last].updated_seq} on r1"
    )
    code, out = await _exojet("replay", "--check", "--nats", procs.url)
    assert code == 0, out
    assert "check: ok" in out
