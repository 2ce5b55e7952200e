"""The one routed chat every API dialect speaks through.

A dialect (OpenAI chat, Anthropic Messages, Ollama, OpenAI completions and Responses)
turns its request into a `ChatRequest`, hands it to `route`, and reads the answer
either whole (`whole`) or as it comes (`stream_body`); it only shapes what goes in
and out. Model checks, routing, chunks, cancel on disconnect, liveness and the
outcome's error all live here and in the gateway, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from exojet.api import request_rules as rules
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError, bad_request, invalid, not_found, unavailable
from exojet.api.gateway import Gateway, api_error
from exojet.bus.chat_ends import ChatError, Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.nats.chat_stream import ChatStream
from exojet.bus.replies import StateReply
from exojet.bus.sampling import DEFAULT_MAX_TOKENS as RUNNER_MAX_TOKENS
from exojet.bus.statuses import InstanceStatus
from exojet.bus.tools import ToolCallDelta
from exojet.projections.instances import FAILED, READY, on_its_way

# What a streamed answer yields: text deltas, then its Complete status or the error it ended with.
Piece = str | Ended | ApiError
# A chat's text: plain text of its one answer, or a ChoiceDelta (an answer of `n`, with its tokens'
# log-probabilities) for a dialect that asks for those.
Said = str | ChoiceDelta
# The same with the pieces of its tool calls and its ChoiceDeltas, for a dialect that renders them.
CallPiece = Said | ToolCallDelta | Ended | ApiError
T = TypeVar("T")
NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def served_models(state: StateReply) -> list[str]:
    """Models with at least one Ready instance."""
    return sorted({i.model_id for i in state.instances.values() if i.status == READY})


def model_status(state: StateReply, model: str) -> InstanceStatus | None:
    """Ready if an instance of `model` is; else the status of one on its way (a Failed attempt
    that is placed again too: 503, not 404, while a drain or a lost runner moves it); None if it
    has none."""
    statuses = [i.status for i in state.instances.values() if i.model_id == model and on_its_way(i.status, i.gave_up)]
    if READY in statuses:
        return READY
    return statuses[0] if statuses else None


async def check_model(gateway: Gateway, model: str) -> None:
    """Nothing if `model` has a Ready instance; else ApiError 404 (none) or 503 (on its way)."""
    recent = gateway.recent_view()
    if recent is not None and model_status(recent, model) == READY:
        return
    status = model_status(await gateway.cluster(), model)
    if status != READY:
        status = model_status(await gateway.cluster(fresh=True), model)
    if status is None:
        served = ", ".join(served_models(await gateway.cluster())) or "none"
        raise not_found(
            f"The model {model!r} does not exist or has no instance (served: {served}); "
            f"place it with `exojet place {model}`"
        )
    if status == FAILED:
        raise unavailable(f"the model {model!r} is being placed again (its attempt failed)", "model_not_ready")
    if status != READY:
        raise unavailable(f"the model {model!r} is {status}, not Ready yet", "model_not_ready")


async def route(gateway: Gateway, req: ChatRequest) -> ChatStream:
    """The chat routed to a Ready instance of its model (ApiError when it cannot be)."""
    await check_model(gateway, req.model)
    stream = await gateway.open_chat()
    try:
        await gateway.submit(stream, req)
    except BaseException:
        gateway.close(stream, "the request failed before its chat was routed")
        raise
    return stream


async def call_pieces(gateway: Gateway, stream: ChatStream) -> AsyncIterator[CallPiece]:
    """The chat's text deltas and tool-call pieces as they come, then its Complete status or the
    error it ended with."""
    try:
        async for piece in gateway.session.answer(stream):
            yield piece
    except ChatError as err:
        yield api_error(err)


async def pieces(gateway: Gateway, stream: ChatStream) -> AsyncIterator[Piece]:
    """The chat's text deltas as they come, then its Complete status or the error it ended with."""
    async for piece in text_pieces(call_pieces(gateway, stream)):
        yield piece


async def text_pieces(source: AsyncIterator[CallPiece]) -> AsyncIterator[Piece]:
    """`source` less its tool-call pieces, its first answer's text as plain text (a dialect that
    takes no tools, `n` or `logprobs`: its chats make none of them)."""
    async for piece in source:
        if isinstance(piece, ChoiceDelta):
            if piece.choice == 0 and piece.text:
                yield piece.text
        elif not isinstance(piece, ToolCallDelta):
            yield piece


def said_text(said: list[Said]) -> str:
    """The first answer's text in `said`."""
    return "".join(p if isinstance(p, str) else p.text for p in said if isinstance(p, str) or p.choice == 0)


def tokens(outcome: Ended) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a completed chat."""
    return outcome.result.prompt_tokens, outcome.result.completion_tokens


def finish_reason(outcome: Ended) -> str:
    """OpenAI's word for how the chat ended: `stop` or `length` (`cancelled` once cancelled)."""
    return outcome.result.finish_reason


async def whole(request: Request, gateway: Gateway, stream: ChatStream) -> tuple[str, Ended] | None:
    """The whole answer and its Complete status; None when the client went away first
    (its chat is cancelled); ApiError when the chat ended otherwise."""
    answered = await whole_said(request, gateway, stream)
    return None if answered is None else (said_text(answered[0]), answered[1])


async def whole_said(request: Request, gateway: Gateway, stream: ChatStream) -> tuple[list[Said], Ended] | None:
    """`whole`, its text as it came: each answer's of `n`, with its tokens' log-probabilities."""

    async def collect() -> tuple[list[Said], Ended]:
        parts: list[Said] = []
        async for piece in call_pieces(gateway, stream):
            if isinstance(piece, str | ChoiceDelta):
                parts.append(piece)
            elif isinstance(piece, ApiError):
                raise piece
            elif isinstance(piece, Ended):
                return parts, piece
        raise AssertionError("an answer always ends with its outcome")

    answer = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            gateway.close(stream, "client disconnected")
    if not answer.done() or answer.cancelled():
        return None
    gateway.close(stream, "answered")
    return answer.result()


async def _first_said(gateway: Gateway, stream: ChatStream) -> AsyncIterator[CallPiece]:
    """The chat's pieces, once its first has come: an error before it (the runner refused the chat:
    its context window, its template, a schema that does not compile) is raised here, so the
    client gets it in the dialect's error shape with its status, before any byte of a stream."""
    source = call_pieces(gateway, stream)
    try:
        first = await anext(source)
    except BaseException:
        gateway.close(stream, "the request failed before its answer began")
        raise
    if isinstance(first, ApiError):
        gateway.close(stream, "its chat failed before its answer began")
        raise first

    async def chained() -> AsyncIterator[CallPiece]:
        yield first
        async for piece in source:
            yield piece

    return chained()


def stream_body(
    source: AsyncIterator[CallPiece],
    gateway: Gateway,
    stream: ChatStream,
    render: Callable[[AsyncIterator[CallPiece]], AsyncIterator[bytes]],
    media_type: str,
) -> StreamingResponse:
    """A streamed answer: `render` turns the chat's pieces (from `source`) into the dialect's bytes."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for part in render(source):
                yield part
        finally:
            # Runs when the stream ends and when the client goes away mid-way
            # (the response is cancelled): an unfinished chat is cancelled.
            gateway.close(stream, "client disconnected")

    return StreamingResponse(body(), media_type=media_type, headers=NO_BUFFERING)


async def respond(
    request: Request,
    gateway: Gateway,
    req: ChatRequest,
    events: Callable[[str, AsyncIterator[Piece]], AsyncIterator[bytes]],
    reply: Callable[[str, str, Ended], Any] | None,
    media_type: str = "text/event-stream",
    call_events: Callable[[str, AsyncIterator[CallPiece]], AsyncIterator[bytes]] | None = None,
    said_reply: Callable[[str, list[Said], Ended], Any] | None = None,
) -> Response:
    """Route `req`, then answer as a dialect does: streamed (`events` of the chat id and its
    pieces, or `call_events` of them with their tool-call pieces and ChoiceDeltas) when it asked
    for a stream, else `reply(chat id, text, outcome)` (or `said_reply` of its text as it came) as JSON."""
    stream = await route(gateway, req)
    if req.stream:
        source = await _first_said(gateway, stream)
        render = call_events or (lambda chat_id, p: events(chat_id, text_pieces(p)))
        return stream_body(source, gateway, stream, lambda p: render(stream.chat_id, p), media_type)
    answered = await whole_said(request, gateway, stream)
    if answered is None:
        return gone()
    said, outcome = answered
    if said_reply is not None:
        return json_response(said_reply(stream.chat_id, said, outcome))
    assert reply is not None, "a dialect answers with reply or said_reply"
    return json_response(reply(stream.chat_id, said_text(said), outcome))


def gone() -> Response:
    """What a request whose client went away gets (nobody reads it)."""
    return Response(status_code=499)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; `event` names it (Anthropic and Responses do, OpenAI chat does not)."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + msgspec.json.encode(data) + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def convert(data: Any, kind: type[T]) -> T:
    """`data` as a `kind`, or ApiError(400) naming the field (`param`) and what is wrong with it."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as err:
        raise invalid(err) from None


def strict_body(data: dict[str, Any], kind: type[T], refused: dict[str, str], unknown: Callable[[str], str]) -> T:
    """`data` as a `kind` (whose service refuses fields it does not know: `unknown(name)` says
    so in its words), after `refused`'s fields are refused by name (`request_rules.refuse`)."""
    data = rules.refuse(data, refused)
    extra = [k for k in data if k not in kind.__struct_fields__]  # type: ignore[attr-defined]
    if extra:
        raise bad_request(unknown(extra[0]), param=extra[0], code="unknown_parameter")
    return convert(data, kind)


def answer_length(value: int | None, name: str, limit: int) -> int | None:
    """The most tokens a chat may answer: `value` (ApiError(400) past `limit`), or when the
    request names none, the runner's default, but never past `limit` (`--max-tokens-limit`)."""
    if value is not None and value > limit:
        raise bad_request(f"{name}: must be at most {limit}, got {value}", param=name, code="invalid_value")
    if value is None and limit < RUNNER_MAX_TOKENS:
        return limit
    return value
