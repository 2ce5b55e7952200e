"""The query service: NATS Services API endpoints over the projection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from exojet import __version__
from exojet.bus import subjects
from exojet.bus.nats.log_fold import MinSeqTimeout
from exojet.bus.queries import QueryRequest
from exojet.bus.replies import AnyReply, Connections, Refusal, RefusalReply, StateReply
from exojet.projections.queries import (
    Filters,
    Paging,
    QueryError,
    instance_reply,
    runner_reply,
    state_reply,
    task_reply,
)
from exojet.projections.state import ClusterState
from exojet.supervisor.projector import Projector

SERVICE_NAME = "exojet-supervisor"
MAX_MIN_SEQ_TIMEOUT_S = 60.0


def _paging(query: QueryRequest) -> Paging:
    return Paging(offset=query.offset, limit=query.limit)


def _filters(query: QueryRequest) -> Filters:
    return Filters(sections=query.sections, runner_status=query.runner_status, instance_status=query.instance_status)


_decoder = msgspec.json.Decoder(QueryRequest)
_encoder = msgspec.json.Encoder()

Answer = Callable[[ClusterState, QueryRequest], AnyReply]


def _need(value: str | None, field: str) -> str:
    if not value:
        raise QueryError("BadRequest", f'the request body must name `{field}`, e.g. {{"{field}": "..."}}')
    return value


def _state(state: ClusterState, query: QueryRequest) -> StateReply:
    return state_reply(state, _paging(query), _filters(query), query.hash)


ANSWERS: dict[str, tuple[str, Answer]] = {
    "state": (subjects.QUERY_STATE, _state),
    "runner": (subjects.QUERY_RUNNER, lambda s, q: runner_reply(s, _need(q.runner_id, "runner_id"), _paging(q))),
    "task": (subjects.QUERY_TASK, lambda s, q: task_reply(s, _need(q.task_id, "task_id"))),
    "instance": (subjects.QUERY_INSTANCE, lambda s, q: instance_reply(s, _need(q.instance_id, "instance_id"))),
}


async def start_service(
    nc: NATS,
    projector: Projector,
    supervisor_id: str,
    connections: Callable[[], Connections] | None = None,
) -> Service:
    """Register `exojet-supervisor` with its state, runner, task and instance endpoints.

    `connections()` is added to every `state` reply (not in the log: from the parts themselves).
    """
    service = await add_service(
        nc,
        name=SERVICE_NAME,
        version=__version__,
        description="exojet supervisor: queries of the cluster projection (body: optional JSON "
        "{min_seq, timeout, runner_id, task_id, instance_id, offset, limit, sections, runner_status, "
        "instance_status, hash}; every reply carries seq)",
        metadata={"supervisor_id": supervisor_id},
    )
    for name, (subject, answer) in ANSWERS.items():
        if name == "state" and connections is not None:
            answer = _with_connections(connections)
        await service.add_endpoint(name=name, subject=subject, handler=_handler(projector, answer, supervisor_id))
    return service


def _with_connections(connections: Callable[[], Connections]) -> Answer:
    return lambda state, query: msgspec.structs.replace(_state(state, query), connections=connections())


def _handler(projector: Projector, answer: Answer, supervisor_id: str) -> Callable[[Request], Any]:
    async def handle(req: Request) -> None:
        seq = projector.state.seq
        try:
            query = _decoder.decode(req.data) if req.data.strip() else QueryRequest()
            timeout = min(max(query.timeout, 0.0), MAX_MIN_SEQ_TIMEOUT_S)
            state = await projector.wait_for(query.min_seq, timeout)
            reply = msgspec.structs.replace(
                answer(state, query),
                supervisor_id=supervisor_id,
                warning=projector.gap if projector.gap is not None else msgspec.UNSET,
            )
            await req.respond(_encoder.encode(reply))
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            await _error(req, "BadRequest", f"request body: {err}", seq)
        except MinSeqTimeout as err:
            await _error(req, "Timeout", str(err), projector.state.seq)
        except QueryError as err:
            await _error(req, err.code, err.message, projector.state.seq)

    return handle


async def _error(req: Request, code: str, message: str, seq: int) -> None:
    logger.bind(subject=req.subject, seq=seq).info(f"query refused: {code}: {message}")
    body = _encoder.encode(RefusalReply(seq=seq, error=Refusal(type=code, message=message)))
    await req.respond_error(code, message, data=body)
