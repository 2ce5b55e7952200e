"""Shared fixtures: real nats-server processes on free loopback ports, the tiny model, a
watch on the log, a runner process, and the runners and supervisors of orchestration tests."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from nats.aio.client import Client as NATS

from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer
from testbed.log_watcher import LogWatch, LogWatcher
from testbed.tiny_model import write_tiny_llama
from tests.api_stack import API_KEY, ApiStack, start_gguf_stack
from tests.cluster_procs import Procs
from tests.procs import stop
from tests.runner_harness import RunnerHandle, start_runner


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream, its store in the test's tmp dir."""
    server = NatsServer(port=0, monitor_port=0, store_dir=tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A connection to `nats_server` with exojet's streams created."""
    conn = await client.connect(nats_server.url, name="test")
    await stream_setup.ensure_streams(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama, written once per session (do not modify it in a test)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def gguf_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiStack]:
    """A stack of a module's own serving the tiny model on llama.cpp."""
    s = start_gguf_stack(tmp_path_factory.mktemp("gguf-stack"), tiny_model_dir)
    yield s
    s.close()


@pytest.fixture
def gguf_client(gguf_stack: ApiStack) -> openai.OpenAI:
    """The official client of `gguf_stack`'s OpenAI routes."""
    return openai.OpenAI(base_url=gguf_stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A models dir holding the tiny llama as `local/tiny`."""
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / "local--tiny")
    return root


@pytest.fixture
async def watcher(nc: NATS) -> AsyncIterator[LogWatcher]:
    """Every log entry from the start, as it is written."""
    w = await LogWatcher().start(nc)
    yield w
    await w.stop()


@pytest.fixture
async def runner(
    nats_server: NatsServer, models_dir: Path, watcher: LogWatcher, tmp_path: Path
) -> AsyncIterator[RunnerHandle]:
    """Runner r1, registered; stopped after the test."""
    handle = await start_runner(nats_server.url, models_dir, watcher, tmp_path)
    yield handle
    stop(handle.proc)


@pytest.fixture
async def watch(nc: NATS) -> LogWatch:
    w = LogWatch()
    await w.start(nc)
    return w


@pytest.fixture
def procs(nats_server: NatsServer, models_dir: Path, tmp_path: Path) -> Procs:
    p = Procs(nats_server.url, models_dir, tmp_path)
    yield p
    p.stop_all()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "the soak (tests/test_soak.py, `-m soak`)")
    group.addoption("--soak-seed", type=int, default=None, help="the fault schedule's seed (default: a new one)")
    group.addoption("--soak-minutes", type=float, default=3.0, help="how long faults are injected")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A soak's time bound follows its length: setup, the faults, and the end's checks. A test
    class that names its `QUICK` tests runs the others in the slow step (a contract run again on
    a big model: what does not depend on the model is already run quickly on a tiny one)."""
    bound = int(config.getoption("soak_minutes") * 60 + 1200)
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(bound))
        quick = getattr(getattr(item, "cls", None), "QUICK", None)
        if quick is not None and getattr(item, "originalname", item.name) not in quick:
            item.add_marker(pytest.mark.slow)
