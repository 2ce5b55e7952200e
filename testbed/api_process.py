"""The one wait for a started `exojet api` to answer: until its /health says it has NATS."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

# How often /health is asked while the API process starts.
POLL_S = 0.1


def _exited(proc: subprocess.Popen[Any] | None, log: Path | None) -> str | None:
    """What to fail with if the API process ended (its log's end), else None."""
    if proc is None or proc.poll() is None:
        return None
    said = log.read_text()[-3000:] if log is not None and log.exists() else ""
    return f"exojet api exited with {proc.returncode}: {said}"


def until_healthy(
    url: str, proc: subprocess.Popen[Any] | None = None, log: Path | None = None, timeout: float = 30.0
) -> None:
    """Until `url`/health answers 200 (failing past `timeout` s, or at once if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        assert (exited := _exited(proc, log)) is None, exited
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the API did not answer {url}/health within {timeout} s"
        time.sleep(POLL_S)


async def until_healthy_async(
    url: str, proc: subprocess.Popen[Any] | None = None, log: Path | None = None, timeout: float = 30.0
) -> None:
    """`until_healthy` for a test's event loop."""
    async with asyncio.timeout(timeout), httpx.AsyncClient(timeout=2.0) as http:
        while True:
            assert (exited := _exited(proc, log)) is None, exited
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(POLL_S)
