"""The host rows of bench/failover.py: the `EXO_LOG` leader's node SIGKILLed, and its host cut off
(its switch port down: nothing closes, nothing answers), on hosts made of network namespaces
(testbed/netns.py, as tests/test_cluster_hosts.py deploys them: three nodes under auth, two
supervisors, two runners, the bench on a client host).

Each round: a calm chat, then the fault and at once a routed chat; its time to the answer is
exojet's failover. Beside it, on the client host: a bare nats-py client (its defaults, the same
server list) publishing to `EXO_LOG` in a loop (its error window: from the fault to its first
acknowledged publish sent after it); a probe on a node that stays up asking who leads `EXO_LOG`
(the election); and two connections to the faulted node alone, one with exojet's options and one
with nats-py's defaults (when each notices: ping detection). The node comes back (restarted, or
cabled again) and the cluster is caught up before the next round.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats
import psutil

from exojet.bus import streams
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.ids import chat_id_of, chat_task_id
from exojet.bus.nats import client, connect_options
from exojet.bus.nats.connection import MAX_OUTSTANDING_PINGS, PING_INTERVAL_S
from exojet.bus.ops import identities
from exojet.bus.ops.permissions import ADMIN, CLIENT
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.projections.words import message_of
from testbed.hosts_harness import CLIENT_PORT, NODES, RUNNERS, SUPERVISORS, Deployment
from testbed.netns import Lan

# Sends a routed chat through the servers of a URL and returns once it is answered.
ChatTimer = Callable[[str], Awaitable[float]]


class BareWindow(Protocol):
    """bench/failover.py's bare nats-py publish loop."""

    def __init__(self, url: str, connect_kwargs: dict[str, Any]) -> None: ...

    async def run(self, stop: asyncio.Event) -> None: ...

    async def window_after(self, t0: float, timeout: float = 120.0) -> float: ...


@dataclass
class Round:
    answered_s: float
    bare_window_s: float | None
    election_s: float
    ours_noticed_s: float | None
    bare_noticed_s: float | None
    # The chat's way through the log, each from the fault (stream timestamps; see `_phases`).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Rows:
    calm: list[float] = field(default_factory=list)
    by_fault: dict[str, list[Round]] = field(default_factory=dict)


class Noticed:
    """When a connection to one node alone learns that node is gone."""

    def __init__(self) -> None:
        self.at: float | None = None

    async def disconnected(self) -> None:
        if self.at is None:
            self.at = time.monotonic()


async def _leader(nc: nats.NATS) -> str:
    info = await client.until_done(lambda: nc.jetstream().stream_info(streams.LOG_STREAM), "stream info")
    return info.cluster.leader if info.cluster and info.cluster.leader else ""


async def _caught_up(nc: nats.NATS) -> str:
    """The EXO_LOG leader once both followers are current (bounded)."""
    async with asyncio.timeout(180):
        while True:
            info = await client.until_done(lambda: nc.jetstream().stream_info(streams.LOG_STREAM), "stream info")
            cluster = info.cluster
            replicas = cluster.replicas or [] if cluster else []
            if cluster and cluster.leader and len(replicas) == 2 and all(r.current for r in replicas):
                return cluster.leader
            await asyncio.sleep(0.2)  # poll: catching up has no event a client can wait on


async def _election(probe: nats.NATS, old: str, t0: float) -> float:
    """Seconds from `t0` until a node other than `old` leads EXO_LOG (asked on a node that stays up)."""
    async with asyncio.timeout(120):
        while True:
            try:
                info = await probe.jetstream(timeout=0.5).stream_info(streams.LOG_STREAM)
                if info.cluster and info.cluster.leader and info.cluster.leader != old:
                    return time.monotonic() - t0
            except Exception:  # no leader yet: the API answers an error or nothing
                pass
            await asyncio.sleep(0.05)  # poll: an election has no event a client can wait on


def _kill(d: Deployment, node: str) -> None:
    """SIGKILL of the node's nats-server (a crash): its `exojet nats` exits with it."""
    for child in psutil.Process(d.nodes[node].pid).children(recursive=True):
        if child.name() == "nats-server":
            child.send_signal(signal.SIGKILL)
    d.nodes[node].wait(30)


# How long the bare loop's window is waited for: past it, it is reported as longer.
BARE_WAIT_S = 60.0
PHASES = ("command stored", "chat task published", "task Running", "task Complete")


async def _phases(nc: nats.NATS, after_seq: int, t0_wall: float) -> dict[str, float]:
    """When the chat sent after the fault reached each step of its way, in seconds from the fault,
    by the log's own timestamps: its command stored (the client's publish through the election),
    its task published (a supervisor folded and routed it), Running and Complete (the runner)."""
    seen: dict[str, float] = {}
    chat: list[str] = []

    def on_msg(env: Envelope) -> None:
        message = message_of(env)
        at = env.time - t0_wall
        if isinstance(message, RouteChatCompletion) and not chat:
            chat.append(chat_id_of(message.command_id, env.seq))
            seen["command stored"] = at
        elif chat and isinstance(message, ChatCompletion) and message.stream_id == chat[0]:
            seen.setdefault("chat task published", at)
        elif chat and isinstance(message, TaskStatusUpdated) and message.task_id == chat_task_id(chat[0], 0):
            if message.task_status in (TaskStatus.RUNNING, TaskStatus.COMPLETE):
                seen.setdefault(f"task {message.task_status}", at)

    await client.replay(nc, on_msg, start_seq=after_seq + 1, timeout=60)
    return seen


async def _pinned(url: str, d: Deployment, ours: bool) -> tuple[nats.NATS, Noticed]:
    """A connection to one node alone: with exojet's ping options, or nats-py's defaults."""
    noticed = Noticed()
    pings = {"ping_interval": PING_INTERVAL_S, "max_outstanding_pings": MAX_OUTSTANDING_PINGS} if ours else {}
    kwargs = identities.options_for(d.auth, ADMIN).nats_kwargs()
    return await nats.connect(servers=[url], disconnected_cb=noticed.disconnected, **pings, **kwargs), noticed


async def one_round(d: Deployment, nc: nats.NATS, fault: str, chat: ChatTimer, bare: BareWindow) -> Round:
    """One fault (`kill` or `cut`) of the EXO_LOG leader's node, measured; the node back after."""
    leader = await _caught_up(nc)
    alone = f"nats://{d.lan[leader].address}:{CLIENT_PORT}"
    other = next(n for n in NODES if n != leader)
    admin = identities.options_for(d.auth, ADMIN)
    probe = await client.connect(f"nats://{d.lan[other].address}:{CLIENT_PORT}", name="probe", options=admin)
    ours, ours_noticed = await _pinned(alone, d, ours=True)
    bare_alone, bare_noticed = await _pinned(alone, d, ours=False)
    start_seq = await client.until_done(lambda: client.last_seq(nc.jetstream()), "the log's last sequence")
    t0, t0_wall = time.monotonic(), time.time()
    if fault == "kill":
        _kill(d, leader)
    else:
        d.lan[leader].link_down()
    try:
        election = asyncio.ensure_future(_election(probe, leader, t0))
        await chat(d.url)
        answered = time.monotonic() - t0
        try:
            window: float | None = await bare.window_after(t0, BARE_WAIT_S)
        except TimeoutError:
            window = None  # the bare client sat on the cut node: its pings are 2 min apart
        elected = await election
    finally:
        if fault == "kill":
            d.start_node(leader)
        else:
            d.lan[leader].link_up()
    result = Round(
        answered_s=answered,
        bare_window_s=window,
        election_s=elected,
        ours_noticed_s=None if ours_noticed.at is None else ours_noticed.at - t0,
        bare_noticed_s=None if bare_noticed.at is None else bare_noticed.at - t0,
        phases=await _phases(nc, start_seq, t0_wall),
    )
    await client.close(probe)
    for conn in (ours, bare_alone):
        await conn.close()
    return result


def _median(values: list[float | None]) -> str:
    seen = [v for v in values if v is not None]
    if not seen:
        return "none"
    return f"{statistics.median(seen):.2f} s" + ("" if len(seen) == len(values) else f" ({len(seen)} of {len(values)})")


def table(rows: dict[str, list[Round]]) -> str:
    """The medians, a line per fault."""
    head = "| on hosts | next chat answered | bare nats-py error window | ratio | election | ping detection"
    lines = [head + ", exojet's options | ping detection, nats-py defaults |", "|---|---|---|---|---|---|---|"]
    for fault, rounds in rows.items():
        answered = statistics.median(r.answered_s for r in rounds)
        windows = [r.bare_window_s if r.bare_window_s is not None else float("inf") for r in rounds]
        window = statistics.median(windows)
        ratio = f"{answered / window:.2f}x" if 0 < window < float("inf") else "-"
        shown = f"{window:.2f} s" if window < float("inf") else f"over {BARE_WAIT_S:g} s"
        stuck = sum(w == float("inf") for w in windows)
        shown += f" ({stuck} of {len(rounds)} over {BARE_WAIT_S:g} s)" if stuck else ""
        lines.append(
            f"| {fault} (median of {len(rounds)}) | {answered:.2f} s | {shown} | {ratio} "
            f"| {_median([r.election_s for r in rounds])} | {_median([r.ours_noticed_s for r in rounds])} "
            f"| {_median([r.bare_noticed_s for r in rounds])} |"
        )
    lines += ["", "| the next chat, seconds from the fault (medians) | " + " | ".join(PHASES) + " |"]
    lines.append("|---" * (len(PHASES) + 1) + "|")
    for fault, rounds in rows.items():
        cells = [_median([r.phases.get(p) for r in rounds]) for p in PHASES]
        lines.append(f"| {fault} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run_on_hosts(root: Path, model_dir: Path, rounds: int, chat: ChatTimer, bare_loop: type[BareWindow]) -> str:
    """Deploy on namespace hosts, measure `rounds` kills and `rounds` cuts; the table."""
    with Lan([*NODES, *SUPERVISORS, *RUNNERS, "client"]) as lan:
        d = Deployment(lan, root, model_dir)
        try:
            d.start()
            with lan.inside(lan["client"]):
                connect_options.use(identities.options_for(d.auth, CLIENT))
                nc = await d.connect()
                await d.place(nc, "bench")
                await chat(d.url)  # waits for Ready; not counted
                bare = bare_loop(d.url, identities.options_for(d.auth, ADMIN).nats_kwargs())
                stop = asyncio.Event()
                looping = asyncio.ensure_future(bare.run(stop))
                results: dict[str, list[Round]] = {"SIGKILL": [], "host cut off": []}
                try:
                    for i in range(rounds):
                        for fault, key in (("kill", "SIGKILL"), ("cut", "host cut off")):
                            r = await one_round(d, nc, fault, chat, bare)
                            results[key].append(r)
                            bare_s = "stuck" if r.bare_window_s is None else f"{r.bare_window_s:.2f} s"
                            print(
                                f"{key} {i + 1}: chat answered {r.answered_s:.2f} s after, bare loop "
                                f"{bare_s}, election {r.election_s:.2f} s, phases {r.phases}",
                                flush=True,
                            )
                finally:
                    stop.set()
                    await looping
                    await client.close(nc)
                return table(results)
        finally:
            d.stop()
