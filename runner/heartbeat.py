"""Heartbeats on `exo.heartbeat.<runner_id>`: core NATS, once a second, never stored.

Each also says how often, and for how long last, the runner lost its connection
to NATS (`outages`, `last_outage_s`): the supervisor shows it in `exojet state`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.nats import connection

INTERVAL_S = 1.0


async def heartbeat(nc: NATS, runner_id: str, incarnation: Callable[[], int], interval: float = INTERVAL_S) -> None:
    """Publish `{runner_id, incarnation, at, outages, last_outage_s}` every `interval` seconds until cancelled."""
    subject = subjects.heartbeat_subject(runner_id)
    watch = connection.watch(nc)
    while True:
        if nc.is_connected:
            beat = {
                "runner_id": runner_id,
                "incarnation": incarnation(),
                "at": time.time(),
                "outages": watch.outages,
                "last_outage_s": round(watch.last_outage_s, 3),
            }
            await nc.publish(subject, msgspec.json.encode(beat))
        await asyncio.sleep(interval)
