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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A soak's time bound follows its length: setup, the faults, and the end's checks. A contract
    class that names its `MODEL_BOUND` tests runs only those (the contract on the default model:
    what does not depend on the model is run on the tiny ones)."""
    bound = int(config.getoption("soak_minutes") * 60 + 1200)
    kept, dropped = [], []
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(bound))
        bound_to_model = getattr(getattr(item, "cls", None), "MODEL_BOUND", None)
        if bound_to_model is not None and getattr(item, "originalname", item.name) not in bound_to_model:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
