"""Waiting on supervisors in tests: bounded, on the condition itself."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS

from bus.query_client import QueryFailed, query


async def until_answering(nc: NATS, timeout: float = 20.0, **body: Any) -> dict[str, Any]:
    """The first state reply of a supervisor, retrying while none is up yet."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await query(nc, "state", timeout=2.0, **body)
        except QueryFailed as err:
            if err.code not in ("NoSupervisor", "Timeout") or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)  # poll interval while no supervisor is subscribed, not a sync point
