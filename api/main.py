"""`exojet api`: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import asyncio
import signal

import uvicorn
from loguru import logger
from nats.aio.client import Client as NATS

from exojet.api.app import create_app
from exojet.api.config import ApiConfig
from exojet.bus.nats import client


def serve(config: ApiConfig, host: str, port: int) -> int:
    """Run until SIGINT/SIGTERM, also while still waiting for NATS; returns the exit code."""
    shown = f"[{host}]" if ":" in host else host
    print(f"exojet API on http://{shown}:{port}/v1 (NATS {config.nats_url})", flush=True)
    return asyncio.run(_serve(config, host, port))


async def _serve(config: ApiConfig, host: str, port: int) -> int:
    nc = await _connect_unless_stopped(config.nats_url)
    if nc is None:
        logger.info("stopped while waiting for NATS")
        return 0
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, nc), host=host, port=port, log_level="warning", lifespan="on", access_log=False
        )
    )
    await server.serve()
    return 0 if server.started else 1


async def _connect_unless_stopped(url: str) -> NATS | None:
    """A connection to NATS, waiting for a server as long as it takes; None if SIGINT or SIGTERM
    comes first. uvicorn heeds those signals only once its lifespan has started, so the wait
    happens before it: in the lifespan it could only be ended by SIGKILL."""
    loop = asyncio.get_running_loop()
    connecting = asyncio.ensure_future(client.connect(url, name="exojet-api", wait=True))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, connecting.cancel)
    try:
        return await connecting
    except asyncio.CancelledError:
        if not connecting.cancelled():
            raise  # we were cancelled, not the connect by a signal
        return None
    finally:
        # uvicorn installs its own handlers for the serving that follows.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
