"""The soak's cluster and its faults (tests/test_soak.py): testbed/hosts_harness.py's deployment
(three nodes, two supervisors, two runners serving the tiny llama on llama.cpp) with an API on a
host of its own, each node's JetStream store on a small tmpfs of its own, and `inject`, which
puts a scheduled fault (tests/soak_schedule.py) into effect and takes it away again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from pathlib import Path

import psutil
from loguru import logger
from nats.aio.client import Client as NATS

from testbed.hosts_harness import NODES, RUNNERS, SUPERVISORS, Deployment
from testbed.netns import Lan
from tests.cutoff_harness import api_url, start_api
from tests.soak_schedule import API, CUT, KILL, LEADER, STOP, STORE, Fault

# Small, so that filling one takes a moment; the streams of a run of hours fit in it many times.
STORE_MB = 128
FILL = "soak-fill"
FILL_CHUNK = 1 << 22


class SoakCluster:
    """The deployment, the API, and the faults' effects on them."""

    def __init__(self, lan: Lan, root: Path, model_dir: Path) -> None:
        # DEBUG: every process logs each write a server acknowledged ("stored"), which the soak
        # looks for in the log.
        self.d = Deployment(
            lan, root, model_dir, runner_args=("--engine", "llamacpp"), env={"EXOJET_LOG_LEVEL": "DEBUG"}
        )
        self.lan, self.root = lan, root
        self.api = api_url(self.d, lan[API])
        self._mounted: list[Path] = []

    def start(self) -> None:
        for node in NODES:
            store = self.root / f"store-{node}"
            store.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_MB}m", "tmpfs", str(store)], check=True)
            self._mounted.append(store)
        self.d.start()
        start_api(self.d, self.lan[API])

    def stop(self) -> None:
        self.d.stop()
        for store in self._mounted:
            subprocess.run(["umount", "-l", str(store)], check=False)
        self._mounted.clear()

    def pids(self, name: str) -> list[int]:
        """The pids a process name stands for: a node's nats-server, an exojet process, or
        `engine-rN`, the engine child(ren) of runner rN."""
        if name in NODES:
            wrapper = psutil.Process(self.d.nodes[name].pid)
            return [p.pid for p in wrapper.children(recursive=True) if p.name() == "nats-server"]
        if name.startswith("engine-"):
            runner = self.d.procs[name.removeprefix("engine-")]
            try:
                return [p.pid for p in psutil.Process(runner.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
        return [self.d.procs[name].pid]

    def every_pid(self) -> dict[str, int]:
        """Every process of the cluster now, by name (a runner's engine children as `engine-rN`)."""
        found = {name: proc.pid for name, proc in self.d.procs.items() if proc.poll() is None}
        for node in NODES:
            for pid in self.pids(node):
                found[node] = pid
        for runner in RUNNERS:
            for i, pid in enumerate(self.pids(f"engine-{runner}")):
                found[f"engine-{runner}" + (f".{i}" if i else "")] = pid
        return found

    def restart(self, name: str) -> None:
        """Start process `name` again after its kill (a node's `exojet nats` is restarted by
        Deployment.kill_server itself; an engine child by its runner)."""
        if name in SUPERVISORS:
            self.d.start_supervisor(name)
        elif name in RUNNERS:
            self.d.start_runner(name)
        elif name == API:
            start_api(self.d, self.lan[API])

    def _kill(self, name: str) -> str:
        if name in NODES:
            self.d.kill_server(name)
            return f"SIGKILL of {name}'s nats-server, started again"
        pids = self.pids(name)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        if name.startswith("engine-"):
            return f"SIGKILL of {name} (pids {pids})"
        self.d.procs[name].wait(30)
        self.restart(name)
        return f"SIGKILL of {name}, started again"

    def _fill(self, node: str) -> int:
        """Fill node's store to the last byte; how many bytes it took."""
        written = 0
        with open(self.root / f"store-{node}" / FILL, "wb") as f:
            block = b"\0" * FILL_CHUNK
            try:
                while True:
                    written += f.write(block)
                    f.flush()
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
        return written

    async def inject(self, fault: Fault, nc: NATS, in_effect: asyncio.Event) -> str:
        """Put `fault` into effect (then set `in_effect`), hold it, take it away; what was done, in words."""
        if fault.kind == KILL:
            in_effect.set()  # the kill is the thread's first step
            return await asyncio.to_thread(self._kill, fault.target)
        if fault.kind == LEADER:
            leader = await self.d.stream_leader(nc)
            in_effect.set()
            await asyncio.to_thread(self.d.kill_server, leader)
            return f"SIGKILL of the EXO_LOG leader {leader}, started again"
        if fault.kind == STOP:
            pids = self.pids(fault.target)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            in_effect.set()
            try:
                await asyncio.sleep(fault.hold_s)  # the fault's length
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            return f"SIGSTOP of {fault.target} (pids {pids}) for {fault.hold_s} s"
        if fault.kind == CUT:
            host = self.lan[fault.target]
            host.link_down()
            in_effect.set()
            try:
                await asyncio.sleep(fault.hold_s)  # the fault's length
            finally:
                host.link_up()
            return f"{fault.target}'s host cut off for {fault.hold_s} s"
        assert fault.kind == STORE, fault
        filled = await asyncio.to_thread(self._fill, fault.target)
        in_effect.set()
        try:
            await asyncio.sleep(fault.hold_s)  # the fault's length
        finally:
            (self.root / f"store-{fault.target}" / FILL).unlink()
        logger.info(f"{fault.target}'s store was full ({filled} bytes added) for {fault.hold_s} s")
        return f"{fault.target}'s store full for {fault.hold_s} s"

    def exited(self) -> dict[str, int]:
        """Processes that ended by themselves: exojet processes and nodes."""
        nodes = {name: code for name, proc in self.d.nodes.items() if (code := proc.poll()) is not None}
        return {**self.d.exited(), **nodes}

    def namespaces_empty(self) -> dict[str, list[str]]:
        """Processes still in a host's namespace, by host (after stop: none)."""
        left = {}
        for host in self.lan.hosts.values():
            out = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
            if out:
                left[host.name] = out
        return left
