"""Failover benchmark: the time from a SIGKILL of the `EXO_LOG` stream leader to the next chat answered.

One run: a 3-node JetStream cluster on loopback, a supervisor and a runner on the tiny llama (an
instance Ready), all given the server list. Five times: a chat with no fault (the calm time), then
the node leading `EXO_LOG` is killed and a chat is routed at once; its time to the answer is
exojet's failover. Beside it, in the same run, a bare nats-py client (its default options, the
same server list) publishes to `EXO_LOG` in a loop: its error window is the time from the kill to
its first acknowledged publish sent after it. The killed node is started again and the cluster
is caught up before the next kill. Prints the medians and the ratio.

Then, where network namespaces can be made (root), the host rows (bench/failover_hosts.py): on
hosts deployed as tests/test_cluster_hosts.py does, the leader's node SIGKILLed and its host cut
off (nothing closes, nothing answers), each against the bare loop's window, with the election and
when a connection to the faulted node notices (exojet's ping options, nats-py's defaults).

    .venv/bin/python bench/failover.py [--kills 5] [--rounds 3] [--no-hosts]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
from loguru import logger

from bench.failover_hosts import run_on_hosts
from exojet.bus import streams, subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.nats import client, query_client, stream_setup
from exojet.bus.nats.chat_client import route_chat
from exojet.bus.tasks import ChatMessage
from testbed import REPO
from testbed.nats_cluster import NatsCluster
from testbed.netns import unavailable
from testbed.tiny_model import write_tiny_llama

BARE_SUBJECT = "exo.tasks.bench-bare-loop"  # a queue nobody reads: only the stream's leader matters


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exojet.cli.main", *args], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )


class BareLoop:
    """nats-py as it comes: publish in a loop, note when each acknowledged publish was sent."""

    def __init__(self, url: str, connect_kwargs: dict[str, Any] | None = None) -> None:
        self.url = url
        self.connect_kwargs = connect_kwargs or {}
        self.acked_sent_at: list[float] = []
        self.errors = 0
        self.connection_errors = 0

    async def _connection_error(self, err: Exception) -> None:
        self.connection_errors += 1

    async def run(self, stop: asyncio.Event) -> None:
        # nats-py's defaults but for its error callback, which would print a traceback per failure
        # (and the credentials a cluster under auth asks for).
        nc = await nats.connect(servers=self.url.split(","), error_cb=self._connection_error, **self.connect_kwargs)
        js = nc.jetstream()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                await js.publish(BARE_SUBJECT, b"{}")
                self.acked_sent_at.append(sent)
            except Exception:  # every error counts the same here: a publish that was not stored
                self.errors += 1
            await asyncio.sleep(0.01)  # ~100 publishes a second, far below the stream's rate
        await nc.close()

    async def window_after(self, t0: float, timeout: float = 120.0) -> float:
        """Seconds from `t0` to the sending of its first acknowledged publish after `t0`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [t for t in self.acked_sent_at if t > t0]
            if after:
                return after[0] - t0
            await asyncio.sleep(0.01)  # poll: the loop appends as acks come
        raise TimeoutError("the bare nats-py loop never published again")


async def chat_seconds(url: str) -> float:
    started = time.monotonic()
    text = "".join(
        [t async for t in route_chat(url, [ChatMessage("user", "hi")], "local/tiny", max_tokens=4, timeout=120)]
    )
    assert text, "the chat came back empty"
    return time.monotonic() - started


async def caught_up(nc: nats.NATS, size: int) -> str:
    """The leader of EXO_LOG once every replica is current (bounded)."""
    async with asyncio.timeout(120):
        while True:
            info = await client.until_done(lambda: nc.jetstream().stream_info(streams.LOG_STREAM), "stream info")
            cluster = info.cluster
            if cluster and cluster.leader and len(cluster.replicas or []) == size - 1:
                if all(r.current for r in cluster.replicas or []):
                    return cluster.leader
            await asyncio.sleep(0.2)  # poll: catching up has no event a client can wait on


async def main(kills: int, rounds: int, hosts: bool, keep: bool) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    root = Path(tempfile.mkdtemp(prefix="exojet-failover-"))
    try:
        cluster = NatsCluster(root / "cluster").start()
        write_tiny_llama(root / "models" / "local--tiny")
        procs = [
            spawn(["supervisor", "--nats", cluster.url], root / "supervisor.log"),
            spawn(
                ["runner", "--id", "r1", "--nats", cluster.url, "--models-dir", str(root / "models")], root / "r1.log"
            ),
        ]
        stop = asyncio.Event()
        nc = await client.connect(cluster.url, name="bench", wait=True)
        try:
            await client.until_done(lambda: stream_setup.ensure_streams(nc.jetstream()), "create the streams")
            await query_client.first_answer(nc, timeout=120)
            await client.publish(
                nc.jetstream(), subjects.COMMANDS, PlaceInstance(command_id="bench", model_id="local/tiny"), msg_id="b"
            )
            calm = [await chat_seconds(cluster.url)]  # waits for Ready, not counted
            calm.clear()
            bare = BareLoop(cluster.url)
            loop = asyncio.ensure_future(bare.run(stop))
            failover, windows = [], []
            for i in range(kills):
                calm.append(await chat_seconds(cluster.url))
                leader = await caught_up(nc, len(cluster.servers))
                t0, wall = time.monotonic(), time.strftime("%H:%M:%S")
                cluster.node(leader).kill()
                await chat_seconds(cluster.url)
                failover.append(time.monotonic() - t0)
                windows.append(await bare.window_after(t0))
                print(
                    f"kill {i + 1} ({leader}, at {wall}): chat answered {failover[-1]:.2f} s after, "
                    f"bare loop {windows[-1]:.2f} s"
                )
                cluster.node(leader).start()
            stop.set()
            await loop
        finally:
            stop.set()
            await client.close(nc)
            for p in procs:
                p.terminate()
                p.wait(30)
            cluster.stop()
    finally:
        if keep:
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    f, w, c = statistics.median(failover), statistics.median(windows), statistics.median(calm)
    print(f"calm chat: {c:.2f} s (median of {kills})")
    print(f"exojet: leader kill -> next chat answered: {f:.2f} s (median of {kills}; {f - c:.2f} s over calm)")
    print(f"bare nats-py publish loop: error window {w:.2f} s (median of {kills}; {bare.errors} failed publishes)")
    print(f"ratio exojet / bare: {f / w:.2f}x" if w > 0 else "ratio: the bare loop saw no window")
    if not hosts:
        return
    if (why := unavailable()) is not None:
        print(f"no host rows: {why}")
        return
    root = Path(tempfile.mkdtemp(prefix="exojet-failover-hosts-"))
    try:
        write_tiny_llama(root / "tiny")
        print(await run_on_hosts(root, root / "tiny", rounds, chat_seconds, BareLoop))
    finally:
        if keep:
            print(f"host logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="loopback leader kills")
    parser.add_argument("--rounds", type=int, default=3, help="on hosts: kills and cuts each")
    parser.add_argument("--no-hosts", action="store_true", help="loopback only (no namespace hosts)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs (the folder is printed)")
    args = parser.parse_args()
    asyncio.run(main(args.kills, args.rounds, not args.no_hosts, args.keep))
