"""A scratch place for a whole cluster outside pytest (benches, fixture recorders)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from exojet.bus.ops.server import NatsServer
from testbed.tiny_model import write_tiny_llama


@contextlib.contextmanager
def tiny_cluster_dir() -> Iterator[tuple[Path, Path, NatsServer]]:
    """(a temp dir, its models dir holding the tiny llama as `local/tiny`, a fresh nats-server
    storing under it); all removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        write_tiny_llama(models / "local--tiny")
        server = NatsServer(port=0, monitor_port=0, store_dir=root / "nats").start()
        try:
            yield root, models, server
        finally:
            server.stop()
