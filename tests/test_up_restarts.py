"""`exojet up`'s restart decisions (cli/up_children.py), without processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exojet.cli.up_children import Child, ChildKeepsDying, RestartPolicy, exit_reason, keep_alive, restart_delay

POLICY = RestartPolicy(first_backoff_s=0.5, max_backoff_s=4.0, max_restarts=5, window_s=60.0)


def test_a_first_death_is_restarted_at_once_then_the_wait_doubles() -> None:
    deaths: list[float] = []
    delays = []
    for t in (100.0, 101.0, 102.0, 103.0, 104.0):
        deaths.append(t)
        delays.append(restart_delay(deaths, POLICY))
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0]


def test_the_wait_is_capped() -> None:
    policy = RestartPolicy(first_backoff_s=0.5, max_backoff_s=1.5, max_restarts=10, window_s=60.0)
    assert restart_delay([1.0, 2.0, 3.0, 4.0, 5.0], policy) == 1.5


def test_more_deaths_than_the_bound_within_the_window_give_up() -> None:
    assert restart_delay([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], POLICY) is None
    # The same six deaths spread wider than the window: the oldest no longer counts.
    assert restart_delay([0.0, 20.0, 30.0, 40.0, 50.0, 61.0], POLICY) == 4.0


def test_deaths_far_apart_are_each_a_first_death() -> None:
    assert restart_delay([0.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0], POLICY) == 0.0


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=20).map(sorted))
def test_a_delay_is_never_negative_nor_above_the_cap(deaths: list[float]) -> None:
    delay = restart_delay(deaths, POLICY)
    recent = sum(1 for t in deaths if deaths[-1] - t <= POLICY.window_s)
    assert (delay is None) == (recent > POLICY.max_restarts)
    assert delay is None or 0.0 <= delay <= POLICY.max_backoff_s


def test_exit_reasons_name_the_code_or_the_signal() -> None:
    assert exit_reason(0) == "exited with code 0"
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(-signal.SIGTERM) == "killed by SIGTERM"
    assert exit_reason(-200) == "killed by signal 200"


async def test_a_child_that_keeps_dying_stops_the_keeper_naming_it() -> None:
    # Real processes: `true` exits at once, every time it is started.
    policy = RestartPolicy(first_backoff_s=0.01, max_backoff_s=0.02, max_restarts=3, window_s=60.0)
    flapping = Child("flapping", lambda: subprocess.Popen(["true"]), policy)
    steady = Child("steady", lambda: subprocess.Popen(["sleep", "60"]), policy)
    try:
        with pytest.raises(ChildKeepsDying, match=r"flapping exited with code 0, dying 4 times within 60 s"):
            await asyncio.wait_for(keep_alive([flapping, steady]), 10)
        assert flapping.restarts == 3
        assert steady.restarts == 0 and steady.proc.poll() is None
    finally:
        steady.proc.kill()
        steady.proc.wait()
