"""Ask the supervisors' query service (`exo.supervisor.*`)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from exojet.bus import subjects

_ENDPOINTS = {
    "state": subjects.QUERY_STATE,
    "runner": subjects.QUERY_RUNNER,
    "task": subjects.QUERY_TASK,
    "instance": subjects.QUERY_INSTANCE,
}


# A little more than a reconnect's longest backoff (bus/connection.py).
RECONNECT_GRACE_S = 3.0


class QueryFailed(Exception):
    """The query was refused (`code` names why) or nobody answered."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


async def query(nc: NATS, endpoint: str, timeout: float = 10.0, **body: Any) -> dict[str, Any]:
    """The reply of endpoint `state`, `runner`, `task` or `instance` (body fields as keywords, e.g. min_seq)."""
    fields = {k: v for k, v in body.items() if v is not None}
    if fields.get("min_seq"):
        # The supervisor may wait for min_seq for as long as this request waits for its
        # answer (a fold behind a leader election catches up in seconds, not instantly).
        fields["timeout"] = max(timeout - 1.0, 0.1)
    payload = msgspec.json.encode(fields)
    loop = asyncio.get_running_loop()
    # A supervisor whose server went away is back on another within a reconnect's backoff:
    # until then nobody answers, so no responders is asked again for that long.
    moving_until = loop.time() + min(timeout, RECONNECT_GRACE_S)
    while True:
        try:
            msg = await nc.request(_ENDPOINTS[endpoint], payload, timeout=timeout)
            break
        except NoRespondersError:
            if loop.time() < moving_until:
                await asyncio.sleep(0.1)
                continue
            raise QueryFailed(
                "NoSupervisor", "no supervisor answers on exo.supervisor.* (start `exojet supervisor`)"
            ) from None
        except NatsTimeout:
            raise QueryFailed("Timeout", f"no answer from a supervisor within {timeout} s") from None
    try:
        reply = msgspec.json.decode(msg.data, type=dict[str, Any])
    except msgspec.DecodeError as err:
        raise QueryFailed("BadReply", f"the supervisor's reply is not a JSON object: {err}") from None
    if msg.headers and "Nats-Service-Error-Code" in msg.headers:
        error = reply.get("error", {})
        raise QueryFailed(
            error.get("type", msg.headers["Nats-Service-Error-Code"]),
            error.get("message", msg.headers.get("Nats-Service-Error", "")),
        )
    return reply


async def first_answer(nc: NATS, timeout: float = 20.0, **body: Any) -> dict[str, Any]:
    """The state reply of the first supervisor to answer, asking again (bounded) while none is up yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await query(nc, "state", timeout=2.0, **body)
        except QueryFailed as err:
            if err.code not in ("NoSupervisor", "Timeout") or loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)  # poll interval while no supervisor has subscribed yet
