"""exojet deployed on hosts made of network namespaces (testbed/netns.py): a 3-node JetStream
cluster under auth, supervisors and runners each on their own host, the test on a client host.

`Deployment` starts and faults the parts; `Fold` follows the log and folds it as a supervisor
does; `check_settled` asserts what must hold after every fault (see tests/test_cluster_hosts.py).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.commands import DeleteInstance, PlaceInstance, RouteChatCompletion
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.ops import identities
from exojet.bus.ops.permissions import ADMIN
from exojet.bus.statuses import TERMINAL_TASK_STATUSES
from exojet.bus.streams import LOG_STREAM
from exojet.bus.tasks import ChatMessage
from exojet.projections.state import ClusterState, state_hash
from exojet.projections.words import message_of
from testbed import REPO
from testbed.log_watcher import LogWatch
from testbed.netns import Host, Lan

NODES = ("n1", "n2", "n3")
SUPERVISORS = ("s1", "s2")
RUNNERS = ("r1", "r2")
CLIENT_PORT = 4222
ROUTE_PORT = 6222
HEARTBEAT_TIMEOUT_S = "5"


class Fold(LogWatch):
    """The log folded as a supervisor folds it, and what the invariants count in it."""

    def terminal_statuses(self) -> Counter[str]:
        """Terminal statuses per task id, over the whole log: a runner's TaskStatusUpdated, or the
        failure a RunnerLost gives the task its runner was running (the runner never answers it)."""
        seen: Counter[str] = Counter(t.task_id for t in self.state.tasks.values() if t.error_type == "RunnerLost")
        for env in self.envs:
            if env.subject.startswith(subjects.RUNNER_EVENTS_PREFIX):
                event = message_of(env)
                if isinstance(event, TaskStatusUpdated) and event.task_status in TERMINAL_TASK_STATUSES:
                    seen[event.task_id] += 1
        return seen


class Deployment:
    """The hosts and the exojet processes on them."""

    def __init__(
        self,
        lan: Lan,
        root: Path,
        model_dir: Path,
        runner_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.lan = lan
        self.root = root
        self.auth = root / "auth"
        identities.init(self.auth, list(RUNNERS))
        self.url = ",".join(f"nats://{lan[n].address}:{CLIENT_PORT}" for n in NODES)
        self.routes = ",".join(f"nats://{lan[n].address}:{ROUTE_PORT}" for n in NODES)
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.model_dir = model_dir
        # What every runner is started with besides its id and models (e.g. `--engine llamacpp`),
        # and what every exojet process's environment adds (e.g. EXOJET_LOG_LEVEL).
        self.runner_args = runner_args
        self.env = env or {}
        # (seq, Nats-Msg-Id) of everything the test published and saw acknowledged.
        self.acked: list[tuple[int, str]] = []

    def _exojet(self, host: Host, args: list[str], nkey: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "NATS_URL": self.url, "EXOJET_NKEY": str(identities.seed_path(self.auth, nkey))}
        return host.popen([sys.executable, "-m", "exojet.cli.main", *args], self.root / f"{host.name}.log", env=env)

    def start_node(self, name: str) -> None:
        """`exojet nats` on host `name`, with its own copy of the auth dir (it writes its config there)."""
        auth = self.root / f"auth-{name}"
        if not auth.exists():
            shutil.copytree(self.auth, auth)
        host = self.lan[name]
        cmd = [sys.executable, "-m", "exojet.cli.main", "nats", "--auth", str(auth)]
        cmd += ["--listen", f"{host.address}:{CLIENT_PORT}", "--store-dir", str(self.root / f"store-{name}")]
        cmd += ["--name", name, "--cluster", f"nats://{host.address}:{ROUTE_PORT}", "--routes", self.routes]
        self.nodes[name] = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *cmd],
            stdout=open(self.root / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def start(self) -> None:
        for name in NODES:
            self.start_node(name)
        for name in SUPERVISORS:
            self.start_supervisor(name)
        for name in RUNNERS:
            shutil.copytree(self.model_dir, self.root / f"models-{name}" / "local--tiny")
            self.start_runner(name)

    def start_supervisor(self, name: str) -> None:
        """Supervisor `name` on its host (again, after a kill)."""
        args = ["supervisor", "--id", name, "--heartbeat-timeout", HEARTBEAT_TIMEOUT_S]
        self.procs[name] = self._exojet(self.lan[name], args, "supervisor")

    def start_runner(self, name: str) -> None:
        """Runner `name` on its host with its models dir (again, after a kill: a new incarnation)."""
        args = ["runner", "--id", name, "--models-dir", str(self.root / f"models-{name}"), *self.runner_args]
        self.procs[name] = self._exojet(self.lan[name], args, f"runner-{name}")

    def exited(self) -> dict[str, int]:
        """exojet processes (supervisors, runners) that are no longer running, with their codes."""
        return {name: code for name, proc in self.procs.items() if (code := proc.poll()) is not None}

    def kill_server(self, name: str) -> None:
        """SIGKILL of node `name`'s nats-server, as a crash; its `exojet nats` then exits and is started again."""
        wrapper = self.nodes[name]
        for child in psutil.Process(wrapper.pid).children(recursive=True):
            if child.name() == "nats-server":
                child.send_signal(signal.SIGKILL)
        wrapper.wait(30)
        self.start_node(name)

    def restart_server(self, name: str) -> None:
        """A graceful restart of node `name`: SIGTERM to `exojet nats` (`ip netns exec` execs it), which
        stops its server so JetStream closes its files, then the same command again."""
        self.nodes[name].send_signal(signal.SIGTERM)
        self.nodes[name].wait(30)
        self.start_node(name)

    def stop(self) -> None:
        for proc in [*self.procs.values(), *self.nodes.values()]:
            if proc.poll() is None:
                # `ip netns exec` execs the command: the pid is exojet's own.
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.procs.values(), *self.nodes.values()]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def connect(self) -> NATS:
        """The test's connection, as admin, once the streams exist (the nodes create them in the
        background once the cluster's JetStream answers; as admin the test may as well)."""
        nc = await client.connect(self.url, name="test", wait=True, options=identities.options_for(self.auth, ADMIN))
        await client.until_done(lambda: stream_setup.ensure_streams(nc.jetstream()), "create the streams")
        return nc

    async def publish(self, nc: NATS, message: Any, msg_id: str) -> int:
        ack = await client.publish(nc.jetstream(), subjects.COMMANDS, message, msg_id=msg_id)
        self.acked.append((ack.seq, msg_id))
        return ack.seq

    async def place(self, nc: NATS, name: str) -> str:
        await self.publish(nc, PlaceInstance(command_id=name, model_id="local/tiny"), name)
        return f"inst-{name}"

    async def chat(self, nc: NATS, name: str, max_tokens: int = 4000) -> str:
        """A routed chat (a long one); its chat id."""
        command = RouteChatCompletion(
            command_id=name, messages=(ChatMessage("user", "count"),), max_tokens=max_tokens, temperature=0.0
        )
        await self.publish(nc, command, name)
        return f"chat-{name}"

    async def stream_leader(self, nc: NATS) -> str:
        """The node leading EXO_LOG (asked again while it elects one)."""
        async with asyncio.timeout(60):
            while True:
                info = await client.until_done(lambda: nc.jetstream().stream_info(LOG_STREAM), "stream info")
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
                await asyncio.sleep(0.2)  # poll: an election has no event a client can wait on


def _live_instances_ready(state: ClusterState) -> bool:
    live = [i for i in state.instances.values() if i.status not in ("Deleted",) and not i.gave_up]
    return bool(live) and all(i.status == "Ready" for i in live)


async def check_settled(d: Deployment, nc: NATS, fold: Fold, what: str, timeout: float = 180.0) -> None:
    """What must hold after a fault: nothing exited, every instance Ready, every task one terminal
    status, everything acknowledged in the log, two supervisors on the same state."""
    state = await fold.until(
        lambda s: _live_instances_ready(s) and not s.unfinished and not s.pending_chats,
        timeout,
        f"after {what}: instances Ready, every task finished",
    )
    assert not d.exited(), f"after {what}: exojet processes exited: {d.exited()}"
    assert not [i for i in state.instances.values() if i.gave_up], f"after {what}: an instance gave up"
    counts = fold.terminal_statuses()
    assert set(counts) == set(state.tasks), f"after {what}: tasks without a terminal status"
    assert all(n == 1 for n in counts.values()), f"after {what}: {[t for t, n in counts.items() if n != 1]}"
    js = nc.jetstream()
    for seq, msg_id in d.acked:
        stored = await client.until_done(partial(js.get_msg, LOG_STREAM, seq), "get an acknowledged message")
        assert stored.headers is not None and stored.headers.get("Nats-Msg-Id") == msg_id, (what, seq, msg_id)
    await _supervisors_agree(nc, fold, what)


async def _supervisors_agree(nc: NATS, fold: Fold, what: str) -> None:
    hashes: dict[str, str] = {}
    async with asyncio.timeout(60):
        while set(hashes) != set(SUPERVISORS):
            last = fold.state.seq
            try:
                reply = await query(nc, "state", timeout=10.0, min_seq=last, hash=True, limit=1)
            except QueryFailed:
                continue
            if reply.seq == last == fold.state.seq:
                assert isinstance(reply.supervisor_id, str) and isinstance(reply.state_hash, str), reply
                hashes[reply.supervisor_id] = reply.state_hash
            else:
                hashes.clear()  # the log moved on: ask both again at its new end
    assert len(set(hashes.values())) == 1 and state_hash(fold.state) in hashes.values(), (what, hashes)


async def delete_extra(d: Deployment, nc: NATS, fold: Fold, keep: str = "inst-base") -> None:
    """Back to the one instance `keep`, so the next fault's placement has a free runner."""
    for inst in list(fold.state.instances.values()):
        if inst.instance_id != keep and inst.status not in ("Deleted", "Failed"):
            msg_id = f"del-{inst.instance_id}"
            await d.publish(nc, DeleteInstance(command_id=msg_id, instance_id=inst.instance_id), msg_id)
    await fold.until(
        lambda s: all(
            s.runners[x].status == "RunnerIdle" or any(p.runner_id == x for p in s.instances[keep].placements)
            for x in RUNNERS
        ),
        120,
        "the extra instances deleted",
    )
