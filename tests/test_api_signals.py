"""`exojet api` stops on SIGTERM at any moment: waiting for NATS at start, or serving."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx2 as httpx

from exojet.bus.ops.server import NatsServer, free_port
from testbed import REPO


def start_api(nats_url: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "exojet.cli.main", "api", "--nats", nats_url, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def until_line(proc: subprocess.Popen[str], text: str) -> list[str]:
    """Its output up to the first line containing `text` (the test's timeout bounds the wait)."""
    assert proc.stdout is not None
    lines = []
    while text not in (line := proc.stdout.readline()):
        assert line, f"exited with {proc.wait()} before printing {text!r}: {lines}"
        lines.append(line)
    return lines


def stopped_within(proc: subprocess.Popen[str], seconds: float) -> tuple[int, float]:
    """SIGTERM it; its exit code and how long it took (killed, and failing, past `seconds`)."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, time.monotonic() - sent


def test_sigterm_while_waiting_for_nats_stops_the_api() -> None:
    api = start_api(f"nats://127.0.0.1:{free_port()}", free_port())
    until_line(api, "waiting for one")  # no server on that port: it waits
    code, took = stopped_within(api, 5)
    assert code == 0
    assert "stopped while waiting for NATS" in api.communicate()[0]
    print(f"\nexojet api waiting for NATS: stopped {took:.2f} s after SIGTERM")


def test_sigterm_while_serving_stops_the_api(nats_server: NatsServer) -> None:
    port = free_port()
    api = start_api(nats_server.url, port)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the API did not answer /health within 30 s"
        time.sleep(0.1)  # poll interval while the API process starts
    code, took = stopped_within(api, 5)
    # uvicorn shuts down, then dies of the signal it caught, as a process without handlers would.
    assert code in (0, -signal.SIGTERM)
    print(f"\nexojet api serving: stopped {took:.2f} s after SIGTERM (code {code})")
