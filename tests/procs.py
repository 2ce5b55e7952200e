"""Start and stop `exojet` subcommands as real processes in tests."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

# The same stop as `exojet up` uses: SIGTERM, then SIGKILL past the timeout.
from exojet.cli.up_cmd import stop_process as stop  # noqa: F401
from testbed import REPO
from testbed.api_process import until_healthy

# Linux hands out ports from here up to outgoing connections (`ip_local_port_range`).
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def group_ports(count: int = 41) -> str:
    """A `--group-ports START-END` range of `count` ports, each free now, below the ephemeral
    range: a port taken from that range could meanwhile be given to any process's outgoing
    connection (a NATS client's, say), and a rank that cannot listen fails its group."""
    ephemeral_start = int(EPHEMERAL_PORTS.read_text().split()[0])
    for _ in range(100):
        start = random.randrange(10_000, ephemeral_start - count)
        if all(_free(port) for port in range(start, start + count)):
            return f"{start}-{start + count - 1}"
    raise RuntimeError(f"no {count} free ports in a row below {ephemeral_start}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def exojet(*args: str, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`exojet ARGS...` as a child process of the test (logs to `log` if given)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "exojet.cli.main", *args],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def exojet_run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """`exojet ARGS --nats URL` to completion (bounded), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", *args, "--nats", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_api(
    port: int, *args: str, log: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """`exojet api --port PORT ARGS` (`env` added to ours), returned once its /health answers
    (bounded; failing with its log if it exits first)."""
    proc = exojet("api", "--port", str(port), *args, log=log, env=env)
    try:
        until_healthy(f"http://127.0.0.1:{port}", proc, log, timeout)
    except BaseException:
        stop(proc)
        raise
    return proc


def start_runner(
    runner_id: str, url: str, models_dir: Path, logs: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`exojet runner --id RUNNER_ID` on `url`, its log in `logs/<runner_id>.log` (`env` added to ours)."""
    return exojet(
        "runner",
        "--id",
        runner_id,
        "--nats",
        url,
        "--models-dir",
        str(models_dir),
        log=logs / f"{runner_id}.log",
        env=env,
    )


async def exojet_output(*args: str, timeout: float = 60.0) -> str:
    """`exojet ARGS` run to completion (bounded); its output. Fails the test on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exojet.cli.main",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, (out + err).decode()
    return out.decode()
