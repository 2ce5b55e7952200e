"""Heartbeats on `exo.heartbeat.<runner_id>`: core NATS, once a second, never stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus import subjects

INTERVAL_S = 1.0


async def heartbeat(nc: NATS, runner_id: str, incarnation: Callable[[], int], interval: float = INTERVAL_S) -> None:
    """Publish `{runner_id, incarnation, at}` every `interval` seconds until cancelled."""
    subject = subjects.heartbeat_subject(runner_id)
    while True:
        if nc.is_connected:
            await nc.publish(
                subject, msgspec.json.encode({"runner_id": runner_id, "incarnation": incarnation(), "at": time.time()})
            )
        await asyncio.sleep(interval)
