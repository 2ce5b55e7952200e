"""A node whose store fills up (bus/ops/full_store.py): nats-server's stream stops storing (alone; a
cluster node disables its JetStream) and stays so once room is made again; `exojet nats` starts its
server again then, and what was acknowledged before is still there. The store is a small tmpfs of
its own, the node a network namespace of its own (so its ports are its own); both need root, and
the test skips without."""

from __future__ import annotations

import asyncio
import errno
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from exojet.bus import subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops import full_store
from exojet.bus.ops.server import DEFAULT_MONITOR_PORT
from exojet.bus.streams import LOG_STREAM
from testbed.netns import Lan, unavailable

NO_NAMESPACES = unavailable()
pytestmark = pytest.mark.skipif(NO_NAMESPACES is not None, reason=f"no network namespaces: {NO_NAMESPACES}")

STORE_MB = 96


def test_a_restart_is_due_only_for_a_failed_store_with_room() -> None:
    room = full_store.ROOM_BYTES
    assert full_store.restart_due(True, room)
    assert not full_store.restart_due(True, room - 1)
    assert not full_store.restart_due(False, room * 10)
    assert not full_store.restart_due(None, room * 10)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise


async def _failed() -> bool | None:
    return await asyncio.to_thread(full_store.store_failed, DEFAULT_MONITOR_PORT)


@pytest.mark.timeout(240)
async def test_a_full_store_disables_jetstream_until_exojet_nats_starts_its_server_again(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_MB}m", "tmpfs", str(store)], check=True)
    log = tmp_path / "nats.log"
    try:
        with Lan(["n1"]) as lan:
            node = lan["n1"].popen([sys.executable, "-m", "exojet.cli.main", "nats", "--store-dir", str(store)], log)
            try:
                with lan.inside(lan["n1"]):
                    nc = await client.connect("nats://127.0.0.1:4222", name="test", wait=True)
                    js = nc.jetstream()
                    await client.until_done(lambda: stream_setup.ensure_streams(js), "create the streams")
                    acked = []
                    for i in range(5):
                        ack = await client.publish(js, subjects.COMMANDS, PlaceInstance(model_id="m"), msg_id=f"b{i}")
                        acked.append((ack.seq, f"b{i}"))

                    await asyncio.to_thread(_fill, store / "fill")
                    async with asyncio.timeout(60):
                        while await _failed() is not True:
                            try:
                                await js.publish(subjects.COMMANDS, b"x" * 1000, timeout=1)
                            except Exception:
                                pass  # refused or unanswered: the store is full, which is the point
                    (store / "fill").unlink()

                    # Acknowledged again: the same `exojet nats` started its server again.
                    async with asyncio.timeout(90):
                        after = await client.until_done(
                            partial(client.publish, js, subjects.COMMANDS, PlaceInstance(model_id="m"), msg_id="a"),
                            "publish once JetStream is back",
                        )
                    assert after.seq > acked[-1][0]
                    assert node.poll() is None, log.read_text()[-2000:]
                    assert await _failed() is False
                    for seq, msg_id in acked:
                        stored = await js.get_msg(LOG_STREAM, seq)
                        assert stored.headers is not None and stored.headers.get("Nats-Msg-Id") == msg_id
                    await nc.close()
            finally:
                node.terminate()
                node.wait(30)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
    assert "a store write failed nats-server (a full store?); restarting it" in log.read_text()
