"""Pipeline parallelism over the real MLX ring backend, ranks as real processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exojet.runner.pipeline import split_layers
from exojet.runner.ring import GroupConnectError, connect_group
from testbed.tiny_model import write_tiny_llama

RANK_SCRIPT = Path(__file__).with_name("pipeline_rank.py")
PROMPT = "The capital of France is"


def free_ports(n: int) -> list[int]:
    """Ports the kernel just handed out; closed again for the ranks to bind."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Rank:
    """A pipeline_rank.py process; stdout is JSON lines, stderr goes to a file."""

    def __init__(self, args: list[str], stderr_path: Path):
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        # A thread drains stdout: reading it with timeouts from here would
        # miss lines that the pipe's buffered reader already holds.
        self._events: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._events.put(json.loads(line))
        self._events.put(None)

    def wait_event(self, event: str, timeout: float) -> dict:
        """The first stdout record with this event, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                record = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if record is None:
                break
            if record["event"] == event:
                return record
        raise AssertionError(f"no {event!r} within {timeout} s; stderr:\n{self.stderr()}")

    def wait_exit(self, timeout: float) -> int:
        """The exit status, or fail (showing stderr) after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_reference(model: Path, max_tokens: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(RANK_SCRIPT),
            "--model",
            str(model),
            "--prompt",
            PROMPT,
            "--max-tokens",
            str(max_tokens),
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in out.stdout.splitlines()]
    return {r["event"]: r for r in records}


def start_ranks(model: Path, ranges: list[tuple[int, int]], tmp_path: Path, *extra: str) -> list[Rank]:
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(len(ranges)))
    ranks = []
    for rank, (start, end) in enumerate(ranges):
        ranks.append(
            Rank(
                [
                    "--model",
                    str(model),
                    "--rank",
                    str(rank),
                    "--world-size",
                    str(len(ranges)),
                    "--hosts",
                    hosts,
                    "--start",
                    str(start),
                    "--end",
                    str(end),
                    "--prompt",
                    PROMPT,
                    "--ignore-eos",
                    *extra,
                ],
                tmp_path / f"rank{rank}.err",
            )
        )
    return ranks


def kill_all(ranks: list[Rank]) -> None:
    for r in ranks:
        r.kill()


def test_split_layers_is_proportional_contiguous_and_complete() -> None:
    assert split_layers(30, [1.0, 1.0]) == [(0, 15), (15, 30)]
    assert split_layers(30, [2.0, 1.0]) == [(0, 20), (20, 30)]
    assert split_layers(6, [1.0, 2.0, 1.0]) == [(0, 2), (2, 4), (4, 6)]
    # A rank with a tiny weight still gets a layer, and so do the ranks after it.
    assert split_layers(4, [100.0, 0.01, 0.01]) == [(0, 2), (2, 3), (3, 4)]
    assert split_layers(3, [1.0, 1.0, 1.0]) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        split_layers(2, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        split_layers(4, [1.0, 0.0])


@pytest.mark.timeout(60)
def test_two_ranks_generate_exactly_what_one_process_does(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny", n_layers=4)
    reference = run_reference(model, max_tokens=24)
    ranks = start_ranks(model, [(0, 2), (2, 4)], tmp_path, "--max-tokens", "24")
    try:
        loaded = [r.wait_event("loaded", 30) for r in ranks]
        done = [r.wait_event("done", 30) for r in ranks]
        for r in ranks:
            assert r.wait_exit(10) == 0, r.stderr()
    finally:
        kill_all(ranks)
    assert len(reference["done"]["tokens"]) == 24
    assert [d["tokens"] for d in done] == [reference["done"]["tokens"]] * 2
    assert [d["text"] for d in done] == [reference["done"]["text"]] * 2
    # Each rank holds, and caches, only its own layers; the others never load.
    assert [(rank["layers"], rank["caches"]) for rank in loaded] == [(2, 2), (2, 2)]
    full = reference["loaded"]["active_memory"]
    assert all(rank["active_memory"] < 0.75 * full for rank in loaded), (loaded, full)


@pytest.mark.timeout(60)
def test_three_ranks_with_an_uneven_split(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny", n_layers=6)
    reference = run_reference(model, max_tokens=16)
    ranges = split_layers(6, [1.0, 2.0, 1.0])
    ranks = start_ranks(model, ranges, tmp_path, "--max-tokens", "16")
    try:
        done = [r.wait_event("done", 40) for r in ranks]
        for r in ranks:
            assert r.wait_exit(10) == 0, r.stderr()
    finally:
        kill_all(ranks)
    assert [d["tokens"] for d in done] == [reference["done"]["tokens"]] * 3


@pytest.mark.timeout(20)
@pytest.mark.parametrize("peer_ip", ["127.0.0.1", "192.0.2.1"])
def test_unreachable_peer_fails_naming_the_host(peer_ip: str) -> None:
    # 127.0.0.1: nobody listens (refused); 192.0.2.1 (TEST-NET): no route or
    # no answer. Neither reaches mlx's init, so this process stays usable.
    own, peer = free_ports(2)
    peer_host = f"{peer_ip}:{peer}"
    started = time.monotonic()
    with pytest.raises(GroupConnectError, match=f"rank 1 at {peer_host}"):
        connect_group("g-unreachable", 2, 0, [f"127.0.0.1:{own}", peer_host], timeout_s=2.0)
    assert time.monotonic() - started < 4.0


@pytest.mark.timeout(30)
def test_a_missing_rank_makes_the_others_fail_within_the_bound(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny", n_layers=3)
    hosts = [f"127.0.0.1:{p}" for p in free_ports(3)]
    common = [
        "--model",
        str(model),
        "--world-size",
        "3",
        "--hosts",
        ",".join(hosts),
        "--connect-timeout",
        "3",
    ]
    ranks = [
        Rank(
            [
                *common,
                "--rank",
                str(rank),
                "--start",
                str(rank),
                "--end",
                str(rank + 1),
            ],
            tmp_path / f"rank{rank}.err",
        )
        for rank in (0, 1)
    ]
    try:
        codes = [r.wait_exit(15) for r in ranks]
        errors = [r.stderr() for r in ranks]
    finally:
        kill_all(ranks)
    assert all(code != 0 for code in codes)
    # Rank 1 cannot reach rank 2; rank 0 waits in vain for rank 2 to join.
    assert f"GroupConnectError: could not reach rank 2 at {hosts[2]}" in errors[1]
    assert f"GroupConnectError: rank 2 at {hosts[2]} did not join" in errors[0]


@pytest.mark.timeout(60)
def test_a_killed_rank_makes_the_other_fail_fast(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny", n_layers=4)
    ranks = start_ranks(model, [(0, 2), (2, 4)], tmp_path, "--max-tokens", "10000000")
    try:
        for r in ranks:
            r.wait_event("generating", 30)
        ranks[1].proc.kill()
        killed_at = time.monotonic()
        code = ranks[0].wait_exit(20)
        elapsed = time.monotonic() - killed_at
        error = ranks[0].stderr()
    finally:
        kill_all(ranks)
    assert code != 0
    assert "connection to a peer was lost" in error
    assert elapsed < 5.0


@pytest.mark.timeout(60)
def test_a_stalled_rank_trips_the_watchdog(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny", n_layers=4)
    ranks = start_ranks(
        model,
        [(0, 2), (2, 4)],
        tmp_path,
        "--max-tokens",
        "10000000",
        "--stall-timeout",
        "3",
    )
    try:
        for r in ranks:
            r.wait_event("generating", 30)
        # A stopped process keeps its sockets open: the ring waits forever.
        os.kill(ranks[1].proc.pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        code = ranks[0].wait_exit(20)
        elapsed = time.monotonic() - stalled_at
        error = ranks[0].stderr()
    finally:
        kill_all(ranks)
    assert code == 1
    assert "Timeout (0:00:03)!" in error
    assert 2.5 <= elapsed < 8.0
