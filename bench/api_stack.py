"""A stack serving a model through `exojet api`, for the API benchmarks: nats-server, a supervisor,
one runner (`bench`) with the model placed and Ready, the API on a free port, all stopped on exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from bench.api import _ensure_streams, _spawn
from bench.inference import prepare_model
from exojet.bus.ops.server import NatsServer, free_port
from exojet.models.store import model_dir
from exojet.runner.engine_choice import EngineWanted, choose_engine, installed_engines
from testbed import REPO
from testbed.api_process import until_healthy


class Served(msgspec.Struct, frozen=True):
    port: int
    nats_url: str
    engine: str
    model_path: Path


@contextmanager
def serving(model_id: str, wanted: EngineWanted) -> Iterator[Served]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        prepare_model(models, model_id)
        engine, _ = choose_engine(model_dir(models, model_id), wanted, installed_engines())
        server = NatsServer(port=0, monitor_port=0, store_dir=root / "nats").start()
        asyncio.run(_ensure_streams(server.url))
        port = free_port()
        procs = [
            _spawn(["supervisor", "--nats", server.url, "--models-dir", str(models)], root / "supervisor.log"),
            _spawn(
                ["runner", "--id", "bench", "--engine", engine, "--nats", server.url, "--models-dir", str(models)],
                root / "r.log",
            ),
            _spawn(["api", "--nats", server.url, "--port", str(port)], root / "api.log"),
        ]
        try:
            placed = subprocess.run(
                [sys.executable, "-m", "exojet.cli.main", "place", model_id, "--runners", "bench", "--wait"]
                + ["--nats", server.url, "--timeout", "300"],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if placed.returncode != 0:
                raise RuntimeError(f"placing {model_id} failed: {placed.stderr}")
            until_healthy(f"http://127.0.0.1:{port}", timeout=60)
            yield Served(port, server.url, engine, model_dir(models, model_id))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)
            server.stop()
