"""Start and stop `exojet` subcommands as real processes in tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

# The same stop as `exojet up` uses: SIGTERM, then SIGKILL past the timeout.
from exojet.cli.up_cmd import stop_process as stop  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


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


def start_runner(runner_id: str, url: str, models_dir: Path, logs: Path) -> subprocess.Popen[bytes]:
    """`exojet runner --id RUNNER_ID` on `url`, its log in `logs/<runner_id>.log`."""
    return exojet(
        "runner", "--id", runner_id, "--nats", url, "--models-dir", str(models_dir), log=logs / f"{runner_id}.log"
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
