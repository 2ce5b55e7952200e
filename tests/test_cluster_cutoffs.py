"""Hosts cut off (their switch port down) under a placement and a streamed chat: a silent host must
cost what a dead one costs. On hosts made of network namespaces (testbed/netns.py): three nodes, two
supervisors, two runners, `exojet api` and the test (with the `exojet` commands it runs) each on a
host of its own. Each cut takes the host of the EXO_LOG leader, the EXO_CHUNKS leader, the node
supervisor s1 is connected to, or the node the API is connected to, for 20 s; one more takes the log
leader's host for 3 minutes. Chats sent before, during and after each cut are answered, through the
API and `exojet chat`; `exojet place --wait` and `exojet state` ride through it; then everything
`check_settled` holds (nothing exited, one terminal status per task, the supervisors' hashes equal
the test's fold), and after the long cut the returning node is current and serves a client alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from nats.aio.client import Client as NATS

from exojet.bus.nats import client
from exojet.bus.streams import CHUNKS_STREAM, LOG_STREAM
from testbed.api_process import until_healthy_async
from testbed.hosts_harness import (
    CLIENT_PORT,
    NODES,
    RUNNERS,
    SUPERVISORS,
    Deployment,
    Fold,
    check_settled,
    delete_extra,
)
from testbed.netns import Lan, unavailable
from tests.cutoff_harness import ApiChat, Ran, api_url, cli, connected_node, start_api, stored_answer

NO_NAMESPACES = unavailable()
pytestmark = [
    pytest.mark.skipif(NO_NAMESPACES is not None, reason=f"no network namespaces: {NO_NAMESPACES}"),
    pytest.mark.slow,
]

# How long a host is cut off (the faults; time is the fault here, not a synchronisation).
CUT_S = 20.0
LONG_CUT_S = 180.0
# A chat long enough to be streaming when the cut comes, short enough to end soon after.
LONG_TOKENS = 600


@dataclass
class Cluster:
    d: Deployment
    nc: NATS
    fold: Fold
    api: str
    # What each cut cost: seconds from the cut to the first chat answered, by the cut's name.
    answered_after: dict[str, float] = field(default_factory=dict)


@pytest.fixture
async def cluster(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Cluster]:
    with Lan([*NODES, *SUPERVISORS, *RUNNERS, "api", "client"]) as lan:
        d = Deployment(lan, tmp_path, tiny_model_dir)
        try:
            d.start()
            with lan.inside(lan["client"]):
                nc = await d.connect()
                start_api(d, lan["api"])
                fold = Fold()
                await fold.start(nc)
                await d.place(nc, "base")
                await fold.until(
                    lambda s: "inst-base" in s.instances and s.instances["inst-base"].status == "Ready",
                    180,
                    "inst-base Ready",
                )
                c = Cluster(d, nc, fold, api_url(d, lan["api"]))
                await _api_up(c)
                yield c
                logger.info(f"cut-offs: seconds from the cut to the first chat answered: {c.answered_after}")
                await nc.close()
        finally:
            d.stop()


async def _api_up(c: Cluster) -> None:
    await until_healthy_async(c.api, c.d.procs["api"], c.d.root / "api.log", timeout=60)


async def _leader(c: Cluster, stream: str) -> str:
    async with asyncio.timeout(60):
        while True:
            info = await client.until_done(lambda: c.nc.jetstream().stream_info(stream), "stream info")
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
            await asyncio.sleep(0.2)  # poll: an election has no event a client can wait on


ROLES: dict[str, Callable[[Cluster], Awaitable[str]]] = {
    "the EXO_LOG leader": lambda c: _leader(c, LOG_STREAM),
    "the EXO_CHUNKS leader": lambda c: _leader(c, CHUNKS_STREAM),
    "s1's server": lambda c: connected_node(c.d, "supervisor-s1"),
    "the API's server": lambda c: connected_node(c.d, "exojet-api"),
}


def _ok(ran: Ran, what: str) -> str:
    assert ran.code == 0, f"{what} exited {ran.code}: {ran.err[-2000:]}"
    return ran.out


def _send_chats(c: Cluster, tag: str) -> tuple[list[ApiChat], list[asyncio.Future[Any]]]:
    """A short chat through the API and one through `exojet chat`, both under way."""
    api = ApiChat(c.api, f"hello {tag}", 8)
    runs: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(api.run()),
        asyncio.ensure_future(cli(c.d, c.d.lan["client"], "chat", f"hi {tag}", "--max-tokens", "8")),
    ]
    return [api], runs


async def _answered(apis: list[ApiChat], runs: list[asyncio.Future[Any]]) -> float:
    """Every chat answered (non-empty); when the first of them ended."""
    ends = [chat.ended for chat in apis]
    for result in await asyncio.gather(*runs):
        if isinstance(result, Ran):
            assert _ok(result, "exojet chat").strip(), "exojet chat printed no answer"
            ends.append(result.ended)
        else:
            assert result, "an API chat came back empty"
    return min(ends)


async def _cut(c: Cluster, name: str, node: str, seconds: float) -> None:
    """Cut `node`'s host off for `seconds` under a placement (`exojet place --wait`) and a streamed
    chat; chats sent before, during and after are answered, and `exojet state` answers during it."""
    d, lan = c.d, c.d.lan
    placing = asyncio.ensure_future(
        cli(d, lan["client"], "place", "local/tiny", "--wait", "--timeout", "240", timeout=300)
    )
    before = ApiChat(c.api, "count", LONG_TOKENS)
    streaming = asyncio.ensure_future(before.run())
    await asyncio.wait_for(before.first_chunk.wait(), 60)
    await c.fold.until(lambda s: len([i for i in s.instances.values() if i.status != "Deleted"]) > 1, 60, "placing")
    cut_at = time.monotonic()
    lan[node].link_down()
    logger.info(f"{node} ({name}) cut off for {seconds:g} s")
    try:
        apis, runs = _send_chats(c, f"during {name}")
        state = asyncio.ensure_future(cli(d, lan["client"], "state"))
        await asyncio.sleep(seconds)  # the fault's length
    finally:
        lan[node].link_up()
    logger.info(f"{node} ({name}) back")
    first = await _answered(apis, runs)
    c.answered_after[f"{name} ({node})"] = round(first - cut_at, 2)
    _ok(await state, "exojet state during the cut")
    assert await streaming, "the chat streaming at the cut came back empty"
    _ok(await placing, "exojet place --wait through the cut")
    after_apis, after_runs = _send_chats(c, f"after {name}")
    await _answered(after_apis, after_runs)
    await check_settled(d, c.nc, c.fold, f"{node} ({name}) cut off for {seconds:g} s")
    for chat in [before, *apis, *after_apis]:
        # Whole and once: what the API streamed is every stored chunk, in order, each once.
        assert chat.chat_id is not None
        stored = await stored_answer(c.nc, chat.chat_id)
        assert chat.text == stored, (name, chat.chat_id, len(chat.text), len(stored))
    assert all(p.poll() is None for p in d.nodes.values()), f"a node exited after the cut of {node}"


@pytest.mark.timeout(1200)
async def test_hosts_cut_off_under_a_placement_and_a_streamed_chat(cluster: Cluster) -> None:
    c = cluster
    for name, role in ROLES.items():
        await _cut(c, name, await role(c), CUT_S)
        await delete_extra(c.d, c.nc, c.fold)
    assert len(c.answered_after) == len(ROLES)

    node = await ROLES["the EXO_LOG leader"](c)
    await _cut(c, "the EXO_LOG leader, for 3 minutes", node, LONG_CUT_S)
    await _caught_up(c, node)
    # It serves again: a client given only the returned node's address is answered.
    alone = f"nats://{c.d.lan[node].address}:{CLIENT_PORT}"
    _ok(await cli(c.d, c.d.lan["client"], "state", "--nats", alone), f"exojet state through {node} alone")
    answer = _ok(await cli(c.d, c.d.lan["client"], "chat", "hi", "--max-tokens", "8", "--nats", alone), "chat")
    assert answer.strip()
    await check_settled(c.d, c.nc, c.fold, f"{node} back after {LONG_CUT_S:g} s away")


async def _caught_up(c: Cluster, node: str) -> None:
    """Every stream has `node` among its current replicas (or leading) again."""
    async with asyncio.timeout(120):
        for stream in (LOG_STREAM, CHUNKS_STREAM):
            while True:
                info = await client.until_done(partial(c.nc.jetstream().stream_info, stream), "stream info")
                cluster = info.cluster
                current = {r.name for r in (cluster.replicas or []) if r.current} if cluster else set()
                if cluster is not None and (cluster.leader == node or node in current):
                    break
                await asyncio.sleep(0.5)  # poll: catching up has no event a client can wait on
