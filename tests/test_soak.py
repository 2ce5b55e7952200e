"""Random faults under load on real processes (`pytest -m soak`; `--soak-minutes M`, `--soak-seed N`).

On hosts made of network namespaces: three JetStream nodes (each store a small tmpfs), two
supervisors, two runners serving concurrent chats of the tiny llama on llama.cpp, `exojet api`
and the test. A stream of chats through the API (some cancelled by their client), placements,
deletions, drains and undrains (tests/soak_load.py) runs while a seeded schedule
(tests/soak_schedule.py) injects a fault every few seconds: SIGKILL and a restart of any process
(a nats-server, a supervisor, a runner, an engine child, the API), SIGSTOP for up to twice the
heartbeat timeout, a host cut off and back, the EXO_LOG leader killed, a node's store filled.

After each fault: a chat is answered through the API again, both supervisors are on our fold's
state, no process ended by itself, every acknowledged write is in the log, no task has two
terminal statuses, no chat hung. At the end (tests/soak_checks.py): every task exactly one
terminal status, every acknowledged write under its id, every completed chat's text stored
whole and once, nothing left running, and (runs over 5 minutes) each exojet process's RSS within
25% of its RSS at 5 minutes (by name, across restarts). The table (tests/soak_report.py) is
printed; a failure prints the seed and the faults injected.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from loguru import logger
from nats.aio.client import Client as NATS

from testbed.api_process import until_healthy_async
from testbed.hosts_harness import HEARTBEAT_TIMEOUT_S, NODES, RUNNERS, SUPERVISORS
from testbed.netns import Lan, unavailable
from tests import soak_checks as check
from tests.gguf_tiny import as_gguf
from tests.soak_cluster import SoakCluster
from tests.soak_load import PROBE_TOKENS, Load
from tests.soak_report import Recovery, table
from tests.soak_schedule import API, Fault, describe, schedule

# A fault the cluster has not come back from in this long is a failure.
RECOVERY_BOUND_S = 300.0
# The pace of probe chats while the cluster is down (each waits for its own answer first).
PROBE_AGAIN_S = 0.5
RSS_AFTER_S = 300.0
RSS_GROWTH = 1.25

# The hosts are network namespaces and the stores tmpfs mounts: root only.
WHY_NOT = unavailable()
pytestmark = [pytest.mark.soak, pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")]


def _rss(c: SoakCluster) -> dict[str, int]:
    """Each process's RSS by its name (supervisor s1, engine-r2, ...): in an hour of faults every
    process is killed at least once, so a name is compared across restarts (one started again
    folds the whole log, which is what bounded state must keep small)."""
    out = {}
    for name, pid in c.every_pid().items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return out


async def _answered(load: Load, errors: list[str], what: str, after: asyncio.Event | None = None) -> float:
    """Probe chats through the API (once `after` is set) until one is answered; the seconds that
    took (what the others met, in `errors`)."""
    if after is not None:
        await after.wait()
    start = time.monotonic()
    try:
        async with asyncio.timeout(RECOVERY_BOUND_S):
            while (probe := await load.chat(PROBE_TOKENS)).outcome != "completed":
                errors.append(probe.error or probe.outcome)
                await asyncio.sleep(PROBE_AGAIN_S)  # the probes' pace, not a synchronisation
    except TimeoutError:
        met = ", ".join(f"{e} x{n}" for e, n in Counter(errors).items())
        raise AssertionError(f"no chat answered within {RECOVERY_BOUND_S} s of {what}: {met}") from None
    return time.monotonic() - start


async def _fault(c: SoakCluster, nc: NATS, fold: check.SoakFold, load: Load, fault: Fault) -> Recovery:
    """Inject `fault` with a probe chat under way from its start (how long chats went unanswered),
    then, from its end, until a chat is answered again and both supervisors hold our state."""
    rec = Recovery(fault, "")
    in_effect = asyncio.Event()
    during = asyncio.ensure_future(_answered(load, rec.errors, str(fault), in_effect))
    try:
        rec.done = await c.inject(fault, nc, in_effect)
    except BaseException:
        during.cancel()
        raise
    ended = time.monotonic()
    rec.unanswered_s = await during
    await _answered(load, rec.errors, f"the end of {fault}")
    rec.answered_s = time.monotonic() - ended
    await check.supervisors_agree(nc, fold, str(fault))
    rec.agreed_s = time.monotonic() - ended - rec.answered_s
    logger.info(f"soak: recovered from {rec.why()}")
    return rec


async def _checked(
    c: SoakCluster, nc: NATS, fold: check.SoakFold, load: Load, acks: check.LoggedAcks, what: str
) -> None:
    assert not c.exited(), f"after {what}: processes ended by themselves: {c.exited()}"
    check.terminal_counts_at_most_one(fold, what)
    await check.acks_in_fold(nc, fold, [*check.acks_of_test(c.d), *acks.read()], what)
    assert not load.hung(), f"after {what}: chats hung: {load.hung()}"


async def _end(c: SoakCluster, nc: NATS, fold: check.SoakFold, load: Load, acks: check.LoggedAcks) -> None:
    await load.stop()
    assert not load.hung(), f"chats hung: {load.hung()}"
    await fold.until(lambda s: not s.unfinished and not s.pending_chats, 180, "every task finished")
    check.terminal_counts_exactly_one(fold)
    every_ack = [*check.acks_of_test(c.d), *acks.read()]
    await check.acks_in_fold(nc, fold, every_ack, "the run")
    await check.acks_under_their_ids(nc, every_ack)
    await check.supervisors_agree(nc, fold, "the run")
    await check.chats_stored_whole(nc, load.chats)
    assert not c.exited(), f"processes ended by themselves: {c.exited()}"


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny llama with its GGUF beside it (the runners are told to use llama.cpp)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    as_gguf(tiny_model_dir, folder / "model.gguf")
    return folder


async def test_random_faults_under_load(
    request: pytest.FixtureRequest, tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = request.config.getoption("soak_seed")
    seed = int.from_bytes(os.urandom(4)) if seed is None else seed
    minutes = request.config.getoption("soak_minutes")
    faults = schedule(seed, float(HEARTBEAT_TIMEOUT_S))
    rss_line = ""
    injected: list[Fault] = []
    recoveries: list[Recovery] = []
    logger.info(f"soak seed {seed}, {minutes:g} minutes")
    with Lan([*NODES, *SUPERVISORS, *RUNNERS, API, "client"]) as lan:
        c = SoakCluster(lan, tmp_path, model_dir)
        load: Load | None = None
        began = time.monotonic()
        try:
            c.start()
            with lan.inside(lan["client"]):
                nc = await c.d.connect()
                fold = check.SoakFold()
                await fold.start(nc)
                await until_healthy_async(c.api, c.d.procs[API], tmp_path / "api.log", timeout=120)
                await c.d.place(nc, "base")
                await fold.until(
                    lambda s: "inst-base" in s.instances and s.instances["inst-base"].status == "Ready",
                    180,
                    "inst-base Ready",
                )
                acks = check.LoggedAcks(tmp_path)
                load = Load(c.api, c.d, nc, fold, seed)
                load.start()
                began = time.monotonic()
                rss_at_5: dict[str, int] | None = None
                for fault in faults:
                    if time.monotonic() - began > minutes * 60:
                        break
                    await asyncio.sleep(fault.gap_s)  # the schedule's quiet time between faults
                    injected.append(fault)
                    logger.info(f"soak: fault {fault}")
                    recoveries.append(await _fault(c, nc, fold, load, fault))
                    await _checked(c, nc, fold, load, acks, str(fault))
                    if rss_at_5 is None and time.monotonic() - began > RSS_AFTER_S:
                        rss_at_5 = _rss(c)
                await _end(c, nc, fold, load, acks)
                if rss_at_5 is not None:
                    now = _rss(c)
                    rss_line = "RSS MB at 5 minutes -> at the end: " + ", ".join(
                        f"{name} {v / 2**20:.0f}->{now[name] / 2**20:.0f}"
                        for name, v in sorted(rss_at_5.items())
                        if name in now
                    )
                    # exojet's processes only: a nats-server's RSS follows its stream caches and Go's
                    # collector (bounded by the streams' limits, its own business), shown, not held.
                    grown = {
                        k: (v, now[k])
                        for k, v in rss_at_5.items()
                        if k in now and k not in NODES and now[k] > v * RSS_GROWTH
                    }
                    assert not grown, f"RSS grew over 25% since 5 minutes in (before, after): {grown}; {rss_line}"
                await nc.close()
        except Exception as err:
            report = table(seed, minutes, time.monotonic() - began, recoveries, load) if load else ""
            raise AssertionError(f"{describe(seed, injected)}\n{report}\n{err!r}") from err
        finally:
            c.stop()
        left = c.namespaces_empty()
        assert not left, f"processes left in the hosts' namespaces: {left}"
    strays = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not strays, f"processes of the soak still running: {strays}"
    with capsys.disabled():
        print("\n" + table(seed, minutes, time.monotonic() - began, recoveries, load) + f"\n{rss_line}")
