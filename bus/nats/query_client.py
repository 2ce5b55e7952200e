"""Ask the supervisors' query service (`exo.supervisor.*`): the reply decoded once, here, into
its struct (bus/replies.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal, TypeVar, overload

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeout

from exojet.bus import subjects
from exojet.bus.nats import connection
from exojet.bus.queries import QueryRequest
from exojet.bus.replies import AnyReply, InstanceReply, RefusalReply, RunnerReply, StateReply, TaskReply

Endpoint = Literal["state", "runner", "task", "instance"]
# Each endpoint's subject and its reply's decoder.
_ENDPOINTS: dict[str, tuple[str, msgspec.json.Decoder[Any]]] = {
    "state": (subjects.QUERY_STATE, msgspec.json.Decoder(StateReply)),
    "runner": (subjects.QUERY_RUNNER, msgspec.json.Decoder(RunnerReply)),
    "task": (subjects.QUERY_TASK, msgspec.json.Decoder(TaskReply)),
    "instance": (subjects.QUERY_INSTANCE, msgspec.json.Decoder(InstanceReply)),
}
_refusal = msgspec.json.Decoder(RefusalReply)
R = TypeVar("R", bound=AnyReply)


# How long a query waits for a supervisor to answer before it fails naming why: through a
# JetStream leader election (4-9 s of raft timeout, more on a loaded cluster), a supervisor's
# reconnect to another server (2-3 s to notice a silent one) and the route that still
# points at a cut-off server's supervisor. It is the publish retry bound (`client.ELECTION_S`):
# a command that got through waits as long for an answer. Measured: docs/design-notes.md.
SUPERVISOR_WAIT_S = 30.0
# The first try's wait for a reply; each further try waits twice as long (capped by the call's
# `timeout`): a request lost on a dead link is asked again soon, a slow answer gets its time.
FIRST_TRY_S = 2.0


# What a request raises when its reply did not come (a dead link, a reconnect under way).
_NO_REPLY = (NatsTimeout, ConnectionReconnectingError, OutboundBufferLimitError)


class QueryFailed(Exception):
    """The query was refused (`code` names why; `answered`: by a supervisor) or nobody answered."""

    def __init__(self, code: str, message: str, answered: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.answered = answered


@overload
async def query(
    nc: NATS, endpoint: Literal["state"], timeout: float = ..., *, wait: float = ..., **body: Any
) -> StateReply: ...
@overload
async def query(
    nc: NATS, endpoint: Literal["runner"], timeout: float = ..., *, wait: float = ..., **body: Any
) -> RunnerReply: ...
@overload
async def query(
    nc: NATS, endpoint: Literal["task"], timeout: float = ..., *, wait: float = ..., **body: Any
) -> TaskReply: ...
@overload
async def query(
    nc: NATS, endpoint: Literal["instance"], timeout: float = ..., *, wait: float = ..., **body: Any
) -> InstanceReply: ...
@overload
async def query(nc: NATS, endpoint: Endpoint, timeout: float = ..., *, wait: float = ..., **body: Any) -> AnyReply: ...
async def query(
    nc: NATS, endpoint: Endpoint, timeout: float = 10.0, *, wait: float = SUPERVISOR_WAIT_S, **body: Any
) -> AnyReply:
    """The reply of endpoint `state`, `runner`, `task` or `instance` (body fields as keywords, e.g. min_seq).

    Asked again while nobody answers, for up to `wait` seconds (at least `timeout`); a try waits
    at most `timeout` for its reply. A supervisor that has not folded `min_seq` is asked again for
    `timeout` seconds in all. Then it raises QueryFailed: `NoSupervisor` (nobody subscribed),
    `Timeout` (nobody replied, or min_seq not reached), or the supervisor's refusal at once.
    """
    # A misspelt field is a TypeError here, not a request the supervisor answers as if unasked.
    request = QueryRequest(**{k: v for k, v in body.items() if v is not None})
    loop = asyncio.get_running_loop()
    bound = max(wait, timeout)
    deadline = loop.time() + bound
    behind_until = loop.time() + timeout
    watcher = connection.watch(nc)
    try_s = min(FIRST_TRY_S, timeout)
    while True:
        this_try = max(min(try_s, deadline - loop.time()), 0.1)
        if request.min_seq:
            # The supervisor waits for min_seq for about as long as this try waits for its answer,
            # and answers by the time min_seq's own bound is up.
            request = msgspec.structs.replace(
                request, timeout=max(min(this_try, behind_until - loop.time()) - 1.0, 0.1)
            )
        outages = watcher.outages
        pause = 0.05
        try:
            subject, decoder = _ENDPOINTS[endpoint]
            msg = await nc.request(subject, msgspec.json.encode(request), timeout=this_try)
            reply: AnyReply = _reply(msg, decoder)
            return reply
        except QueryFailed as err:
            if err.code != "Timeout" or not request.min_seq or loop.time() + pause >= behind_until:
                raise
            failure = err  # the projection is behind (a fold through an election): ask again
        except NoRespondersError:
            failure = QueryFailed(
                "NoSupervisor",
                f"no supervisor answers on exo.supervisor.* (waited {bound:g} s; start `exojet supervisor`)",
            )
        except _NO_REPLY:
            failure = QueryFailed("Timeout", f"no answer from a supervisor within {bound:g} s (asked again meanwhile)")
            # A reconnect of ours lost the request with the old socket: ask again at once.
            pause = 0.0 if watcher.outages != outages else pause
        try_s = min(try_s * 2, timeout)
        if loop.time() + pause >= deadline:
            raise failure from None
        await asyncio.sleep(pause)


def _reply(msg: Msg, decoder: msgspec.json.Decoder[R]) -> R:
    if msg.headers and "Nats-Service-Error-Code" in msg.headers:
        try:
            error = _refusal.decode(msg.data).error
        except (msgspec.DecodeError, msgspec.ValidationError):
            code = msg.headers["Nats-Service-Error-Code"]
            raise QueryFailed(code, msg.headers.get("Nats-Service-Error", ""), answered=True) from None
        raise QueryFailed(error.type, error.message, answered=True)
    try:
        return decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise QueryFailed("BadReply", f"the reply is not a JSON object shaped as its reply: {err}") from None


async def first_answer(nc: NATS, timeout: float = 20.0, **body: Any) -> StateReply:
    """The state reply of the first supervisor to answer, asking again (bounded) while none is up yet."""
    return await query(nc, "state", timeout=2.0, wait=timeout, **body)
