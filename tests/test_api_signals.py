"""`exojet api` stops on SIGTERM at any moment: waiting for NATS at start, or serving."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from exojet.bus.ops.server import NatsServer, free_port
from testbed import REPO
from testbed.api_process import until_healthy


def api_with_output(nats_url: str, port: int) -> subprocess.Popen[str]:
    """`exojet api`, its output readable line by line (`until_line`)."""
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
    api = api_with_output(f"nats://127.0.0.1:{free_port()}", free_port())
    until_line(api, "waiting for one")  # no server on that port: it waits
    code, took = stopped_within(api, 5)
    assert code == 0
    assert "stopped while waiting for NATS" in api.communicate()[0]
    print(f"\nexojet api waiting for NATS: stopped {took:.2f} s after SIGTERM")


def test_sigterm_while_serving_stops_the_api(nats_server: NatsServer) -> None:
    port = free_port()
    api = api_with_output(nats_server.url, port)
    until_healthy(f"http://127.0.0.1:{port}", api)
    code, took = stopped_within(api, 5)
    # uvicorn shuts down, then dies of the signal it caught, as a process without handlers would.
    assert code in (0, -signal.SIGTERM)
    print(f"\nexojet api serving: stopped {took:.2f} s after SIGTERM (code {code})")
