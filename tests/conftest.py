"""Shared fixtures: real nats-server processes on free loopback ports, the tiny model."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from bus import client, streams
from bus.server import NatsServer
from tests.tiny_model import write_tiny_llama


def _docker_available() -> bool:
    if os.environ.get("EXOJET_TEST_DOCKER") != "1" or not shutil.which("docker"):
        return False
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # no engine, no socket, no permission: all mean "not here"
        return False


class ContainerServer:
    """testcontainers' NATS container, with the same surface as NatsServer."""

    def __init__(self) -> None:
        from testcontainers.nats import NatsContainer

        self.container = NatsContainer().with_command("-js")

    def start(self) -> "ContainerServer":
        self.container.start()
        self.url = self.container.nats_uri()
        return self

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream, its store in the test's tmp dir."""
    if _docker_available():
        server = ContainerServer().start()
        yield server  # type: ignore[misc]
        server.stop()
        return
    server = NatsServer(port=0, monitor_port=0, store_dir=tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A connection to `nats_server` with exojet's streams created."""
    conn = await client.connect(nats_server.url, name="test")
    await streams.ensure_streams(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama, written once per session (do not modify it in a test)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A models dir holding the tiny llama as `local/tiny`."""
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / "local--tiny")
    return root
