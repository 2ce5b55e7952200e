"""The processes `exojet up` started, started again when they die.

`restart_delay` decides, from a child's recent deaths alone, how long to wait
before starting it again (at once the first time, then doubling) or that it
keeps dying and `up` should stop (more than `max_restarts` deaths within
`window_s`). `keep_alive` waits for deaths through pidfds: the kernel wakes it
the moment a child exits, nothing polls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from loguru import logger


@dataclass(frozen=True)
class RestartPolicy:
    """How hard `up` tries to keep a child alive."""

    # A child dying for the 2nd time within the window waits first_backoff_s, then twice that ...
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # ... and dying more than max_restarts times within window_s stops `up`.
    max_restarts: int = 5
    window_s: float = 60.0


DEFAULT_POLICY = RestartPolicy()


class ChildKeepsDying(RuntimeError):
    """A child died more often than the policy allows: `up` stops everything."""


class StartFailed(RuntimeError):
    """A child could not be started (it counts as one more death)."""


def restart_delay(deaths: Sequence[float], policy: RestartPolicy = DEFAULT_POLICY) -> float | None:
    """Seconds to wait before starting a child again, given the monotonic times of its deaths
    (the last one just now); None once it died more than `max_restarts` times within the window."""
    now = deaths[-1]
    recent = sum(1 for t in deaths if now - t <= policy.window_s)
    if recent > policy.max_restarts:
        return None
    if recent == 1:
        return 0.0  # a single death is an accident: back at once
    return min(policy.first_backoff_s * 2.0 ** (recent - 2), policy.max_backoff_s)


def exit_reason(returncode: int) -> str:
    """How a process ended, in words: its exit code or the signal that killed it."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Child:
    """One process `up` keeps alive: its role, how to start it, its deaths."""

    def __init__(
        self,
        role: str,
        start: Callable[[], subprocess.Popen[bytes]],
        policy: RestartPolicy,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """Starts it now, unless `proc` is it already running."""
        self.role = role
        self._start = start
        self.policy = policy
        self.proc = proc or start()
        # Only the last max_restarts + 1 deaths can decide anything.
        self.deaths: deque[float] = deque(maxlen=policy.max_restarts + 1)
        self.restarts = 0

    async def keep(self) -> NoReturn:
        """Start the child again whenever it dies; raises ChildKeepsDying past the policy's bound."""
        log = logger.bind(child=self.role)
        while True:
            reason = exit_reason(await _exited(self.proc))
            while True:
                self.deaths.append(time.monotonic())
                delay = restart_delay(self.deaths, self.policy)
                if delay is None:
                    why = f"{self.role} {reason}, dying {len(self.deaths)} times within {self.policy.window_s:.0f} s"
                    log.error("{}: stopping everything", why)
                    raise ChildKeepsDying(why)
                log.warning("{} (pid {}) {}; starting it again in {:.1f} s", self.role, self.proc.pid, reason, delay)
                await asyncio.sleep(delay)
                try:
                    self.proc = self._start()
                    break
                except StartFailed as err:
                    reason = f"did not start again ({err})"
            self.restarts += 1
            log.info("{} started again (pid {}, restart {})", self.role, self.proc.pid, self.restarts)


async def keep_alive(children: Sequence[Child]) -> NoReturn:
    """Keep every child alive until one keeps dying (ChildKeepsDying) or this is cancelled."""
    tasks = [asyncio.ensure_future(child.keep()) for child in children]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
    raise AssertionError("Child.keep never returns")


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """`proc`'s exit code, once it exits (reaped here)."""
    if proc.poll() is not None:
        return proc.returncode
    loop = asyncio.get_running_loop()
    # Readable once the process exits; it stays valid until closed, even after the exit.
    fd = os.pidfd_open(proc.pid)
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()
