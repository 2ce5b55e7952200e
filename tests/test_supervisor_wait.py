"""`exojet state`, `exojet chat`, `exojet place --wait` and the API wait for a supervisor for the
bound (`SUPERVISOR_WAIT_S`, through an election and a reconnect), then fail naming the error."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from exojet.bus.nats.query_client import SUPERVISOR_WAIT_S
from exojet.bus.ops.server import NatsServer, free_port
from testbed import REPO
from testbed.api_process import until_healthy_async
from tests.procs import exojet, stop

pytestmark = pytest.mark.slow

# Past the bound: a process start, a connect, the last try's reply wait.
SLACK_S = 20.0


async def _run(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exojet.cli.main", *args, cwd=REPO, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), SUPERVISOR_WAIT_S + SLACK_S)
    assert proc.returncode is not None
    return proc.returncode, err.decode(), time.monotonic() - started


async def _api_chat(base: str) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(timeout=SUPERVISOR_WAIT_S + SLACK_S) as http:
        await until_healthy_async(base)
        started = time.monotonic()
        body = {"model": "local/tiny", "messages": [{"role": "user", "content": "hi"}]}
        resp = await http.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
        return resp, time.monotonic() - started


@pytest.mark.timeout(120)
async def test_without_a_supervisor_commands_and_the_api_fail_naming_it_after_the_bound(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    port = free_port()
    api = exojet("api", "--nats", url, "--port", str(port), "--api-key", "k", log=tmp_path / "api.log")
    try:
        results = await asyncio.gather(
            _run("state", "--nats", url),
            _run("chat", "hi", "--nats", url),
            _run("place", "local/tiny", "--wait", "--nats", url),
            _api_chat(f"http://127.0.0.1:{port}"),
        )
    finally:
        stop(api)
    *commands, (resp, api_s) = results
    for code, err, took in commands:
        assert code == 1 and "NoSupervisor" in err, err
        assert SUPERVISOR_WAIT_S - 0.5 <= took < SUPERVISOR_WAIT_S + SLACK_S, (took, err)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_supervisor", resp.text
    assert SUPERVISOR_WAIT_S - 0.5 <= api_s < SUPERVISOR_WAIT_S + SLACK_S
