"""exojet on hosts: network namespaces cabled to one switch (testbed/netns.py), a 3-node JetStream
cluster under auth, two supervisors and two runners each on a host of its own, the test on a
client host. Faults hit mid-workflow; after each, `check_settled` holds: no exojet process exited,
every instance Ready again, every task one terminal status, every acknowledged publish in the log,
both supervisors on the same state hash (and ours)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus.statuses import TaskStatus
from testbed.hosts_harness import NODES, RUNNERS, SUPERVISORS, Deployment, Fold, check_settled, delete_extra
from testbed.log_watcher import Predicate
from testbed.netns import Lan, unavailable

NO_NAMESPACES = unavailable()
pytestmark = pytest.mark.skipif(NO_NAMESPACES is not None, reason=f"no network namespaces: {NO_NAMESPACES}")

# How long a host is cut off (the fault; time is the fault here, not a synchronisation).
CUT_S = 20.0


class Running:
    def __init__(self, deployment: Deployment, nc: NATS, fold: Fold) -> None:
        self.d, self.nc, self.fold = deployment, nc, fold


@pytest.fixture
async def running(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Running]:
    with Lan([*NODES, *SUPERVISORS, *RUNNERS, "client"]) as lan:
        deployment = Deployment(lan, tmp_path, tiny_model_dir)
        try:
            deployment.start()
            with lan.inside(lan["client"]):
                nc = await deployment.connect()
                fold = Fold()
                await fold.start(nc)
                await fold.until(
                    lambda s: all(s.runners.get(r) and s.runners[r].status == "RunnerIdle" for r in RUNNERS),
                    120,
                    "runners Idle",
                )
                yield Running(deployment, nc, fold)
                await nc.close()
        finally:
            deployment.stop()


def _ready(instance_id: str) -> Predicate:
    return lambda s: instance_id in s.instances and s.instances[instance_id].status == "Ready"


async def _chat_running(r: Running, name: str) -> str:
    """A long routed chat, once its task is Running on a runner."""
    chat_id = await r.d.chat(r.nc, name)
    await r.fold.until(
        lambda s: any(t.status == TaskStatus.RUNNING for t in s.tasks.values() if t.task_id.startswith(chat_id)),
        60,
        f"{chat_id} running",
    )
    return chat_id


@pytest.mark.timeout(240)
async def test_the_log_leader_killed_during_a_chat_on_three_hosts(running: Running) -> None:
    r = running
    await r.d.place(r.nc, "a")
    await r.fold.until(_ready("inst-a"), 120, "inst-a Ready")
    await _chat_running(r, "c1")
    leader = await r.d.stream_leader(r.nc)
    r.d.kill_server(leader)
    await r.d.chat(r.nc, "c2", max_tokens=8)
    await check_settled(r.d, r.nc, r.fold, f"SIGKILL of {leader}")
    assert r.fold.state.chats["chat-c2"].status == "Complete"


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_fault_matrix_on_three_hosts(running: Running) -> None:
    r = running
    step = iter(range(1000))

    async def placing_and_chatting() -> None:
        """Mid-workflow: an instance being placed and a chat streaming on a Ready one."""
        n = next(step)
        await r.d.place(r.nc, f"p{n}")
        await _chat_running(r, f"m{n}")

    await r.d.place(r.nc, "base")
    await r.fold.until(_ready("inst-base"), 120, "inst-base Ready")

    for kill in (1, 2):
        await placing_and_chatting()
        leader = await r.d.stream_leader(r.nc)
        r.d.kill_server(leader)
        await check_settled(r.d, r.nc, r.fold, f"SIGKILL {kill} of the EXO_LOG leader {leader}")
        await delete_extra(r.d, r.nc, r.fold)

    await placing_and_chatting()
    for name in NODES:
        r.d.restart_server(name)
        await r.d.stream_leader(r.nc)  # the cluster has a log leader again before the next node goes
    await check_settled(r.d, r.nc, r.fold, "a rolling restart of n1, n2, n3")
    await delete_extra(r.d, r.nc, r.fold)

    for host in ("r1", "s1"):
        await placing_and_chatting()
        r.d.lan[host].link_down()
        await asyncio.sleep(CUT_S)
        r.d.lan[host].link_up()
        await check_settled(r.d, r.nc, r.fold, f"{host}'s host cut off for {CUT_S:g} s")
        await delete_extra(r.d, r.nc, r.fold)
