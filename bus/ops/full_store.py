"""A nats-server whose store filled up, started again once the store has room.

What nats-server does when a store write fails for lack of space, and keeps doing after room is
made (a reload, SIGHUP, changes nothing; a restart does): a cluster node disables its JetStream
("JetStream out of File resources, will be DISABLED"), and two such nodes of three leave the
streams without a quorum for good (the soak, tests/test_soak.py, found it: two nodes' stores
filled in turn and the cluster never answered again); a server alone keeps JetStream but the
stream stops storing (its `/healthz` says "write error"), every publish unanswered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

from loguru import logger

from exojet.bus.ops.server import NatsServer

# Free space in the store before the server is started again: room for what it writes on start
# (its raft logs and snapshots), so a store that is still almost full is not restarted in a loop.
ROOM_BYTES = 64 * 1024**2
CHECK_S = 2.0


def restart_due(failed: bool | None, free_bytes: int) -> bool:
    """Start the server again: its store failed it (None: it did not say) and the store has room."""
    return failed is True and free_bytes >= ROOM_BYTES


def _ask(monitor_port: int, path: str) -> tuple[int, str] | None:
    """Status and body of a monitoring endpoint; None when the server does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}{path}", timeout=1) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def store_failed(monitor_port: int) -> bool | None:
    """Whether a store write failed the server: its JetStream disabled (`/jsz`) or a stream's
    write error (`/healthz`); None when it does not answer (stopped, starting, stalled)."""
    jsz = _ask(monitor_port, "/jsz")
    if jsz is None:
        return None
    try:
        if json.loads(jsz[1]).get("disabled"):
            return True
    except ValueError:
        return None
    health = _ask(monitor_port, "/healthz")
    return health is not None and health[0] != 200 and "write error" in health[1]


def serve(server: NatsServer) -> int:
    """Wait for the started `server` to exit by itself (its exit code); meanwhile a server a store
    write failed is started again (same ports, same store) once its store has room."""
    log = logger.bind(store_dir=str(server.store_dir))
    said = False
    while True:
        assert server.process is not None, "serve() waits on a started server"
        try:
            return server.process.wait(CHECK_S)
        except subprocess.TimeoutExpired:
            pass
        failed = store_failed(server.monitor_port)
        free = shutil.disk_usage(server.store_dir).free
        if restart_due(failed, free):
            log.bind(free_bytes=free).warning("a store write failed nats-server (a full store?); restarting it")
            server.stop()
            server.start()
            said = False
        elif failed and not said:
            log.bind(free_bytes=free).warning(
                f"a store write failed nats-server (a full store?): it is started again once the store "
                f"has {ROOM_BYTES // 1024**2} MiB free"
            )
            said = True
