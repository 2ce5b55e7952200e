"""The embedded nats-server leaves no descriptor of its log file open in the process that starts it,
however often it is started again (as `exojet up` does each time it dies)."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

from exojet.bus.ops.server import NatsServer


def _open_in_this_process(path: Path) -> int:
    """How many of this process's descriptors point at `path`."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(fds / fd) == str(path)
        except OSError:
            pass  # the descriptor listdir used, closed meanwhile
    return count


def test_the_log_file_is_not_left_open_across_restarts(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "nats-server.log"
    server = NatsServer(port=0, monitor_port=0, store_dir=tmp_path / "nats", log_file=log)
    # CPython closes a file object nobody refers to when it is collected, warning ResourceWarning:
    # that warning is what a descriptor left to the collector shows.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _start_and_restart(server, log)
        gc.collect()
    unclosed = [
        str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and str(log) in str(w.message)
    ]
    assert unclosed == []
    assert _open_in_this_process(log) == 0


def _start_and_restart(server: NatsServer, log: Path) -> None:
    try:
        server.start()
        pids = [server.process.pid if server.process else 0]
        assert _open_in_this_process(log) == 0
        for _ in range(3):
            server.kill()  # it dies; started again on the same port and store, as `exojet up` does
            server.start()
            pids.append(server.process.pid if server.process else 0)
            assert _open_in_this_process(log) == 0
        assert len(set(pids)) == 4
        # The server itself still writes there, each start appending.
        assert log.read_text().count("Server is ready") == 4
    finally:
        server.stop()
