"""`exojet up` as a process in a test: start it, wait for its Ready line, interrupt it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from exojet.bus.ops.server import free_port
from testbed import REPO


def start_up(tmp_path: Path, port: int, log: Path | None, api_port: int = 0) -> subprocess.Popen[str]:
    """`exojet up` on `port`; its log (stderr) in `log`, or among its stdout lines if None."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "EXO_MODELS_DIR": str(tmp_path / "models")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exojet.cli.main",
            "up",
            "--port",
            str(port),
            "--monitor-port",
            str(free_port()),
            "--api-port",
            str(api_port),
            # As the quickstart runs it (without the llama.cpp extra, whose 8-bit activations
            # give this 135M model another greedy answer to the question).
            "--engine",
            "mlx",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(log, "w") if log else subprocess.STDOUT,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str], timeout: float = 240) -> list[str]:
    """Lines `exojet up` printed until its Ready line (bounded by the test timeout and `timeout`)."""
    lines = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exojet up exited with {proc.wait()} before Ready: {lines}")
        lines.append(line.rstrip())
        if line.startswith("Ready in"):
            return lines
    raise AssertionError(f"exojet up not Ready within {timeout} s: {lines}")


def interrupt(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> int:
    """Send `sig` and wait (bounded) for it to exit; its code (killed past the bound)."""
    proc.send_signal(sig)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
