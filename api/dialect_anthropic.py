"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A request (`anthropic_request.py`) becomes the same routed chat as OpenAI's (`dialect_base`); the
answer goes back as a `message` whose content is its text block and its `tool_use` blocks, or
streamed as Anthropic's named events, one content block at a time (a tool_use block's input as
`input_json_delta` fragments). Errors are `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api.anthropic_request import parse_messages
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError
from exojet.bus.chat_ends import Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.tools import ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from exojet.api.app import Api

# Anthropic's error type for each status (anything else is `api_error`).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
# Anthropic's tool_use ids: letters, digits, `_` and `-` after this prefix.
TOOL_USE_PREFIX = "toolu_"
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_-]")


def error_response(err: ApiError) -> Response:
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}
    return base.json_response(body, err.status, err.headers)


def _stop(req: ChatRequest, outcome: Ended) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a completed chat."""
    reason = base.finish_reason(outcome)
    if reason == "length":
        return "max_tokens", None
    if reason == "tool_calls":
        return "tool_use", None
    if isinstance(req.sampling.stop, tuple):
        # The runner's result says a stop string ended it but not which: named when there is one.
        return "stop_sequence", req.sampling.stop[0] if len(req.sampling.stop) == 1 else None
    return "end_turn", None


def _usage(outcome: Ended) -> dict[str, int]:
    prompt, completion = base.tokens(outcome)
    return {"input_tokens": prompt, "output_tokens": completion}


def tool_use_id(call_id: str) -> str:
    """A call's id as Anthropic's `toolu_...` (the same whole and streamed, so a client's
    tool_result names the call it answers)."""
    return TOOL_USE_PREFIX + _NOT_IN_ID.sub("_", call_id)


def _input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is; a call whose arguments are not a
    JSON object (cut short by max_tokens) has an empty input, its text logged."""
    try:
        arguments = msgspec.json.decode(call.arguments)
    except msgspec.DecodeError:
        arguments = None
    if isinstance(arguments, dict):
        return arguments
    logger.bind(call_id=call.id, arguments=call.arguments).warning("a tool call's arguments are not a JSON object")
    return {}


def _has_tools(req: ChatRequest) -> bool:
    return bool(req.shape.tools)


def _message(chat_id: str, req: ChatRequest, said: list[base.Said], outcome: Ended) -> dict[str, Any]:
    stop_reason, stop_sequence = _stop(req, outcome)
    text = base.said_text(said)
    # A chat without tools always has its text block (as before tools); one with tools has it when
    # it said something, as the stream opens it.
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not _has_tools(req) else []
    content += [
        {"type": "tool_use", "id": tool_use_id(c.id), "name": c.name, "input": _input(c)}
        for c in outcome.result.tool_calls
    ]
    return {
        "id": chat_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(outcome),
    }


class Messages:
    """The routes' handlers."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        req = parse_messages(await request.body(), self.api.config.max_tokens_limit)
        return await base.respond(
            request,
            self.api.gw,
            req,
            lambda chat_id, pieces: _events(chat_id, req, pieces),
            None,
            call_events=lambda chat_id, pieces: _events(chat_id, req, pieces),
            said_reply=lambda chat_id, said, outcome: _message(chat_id, req, said, outcome),
        )

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's tokens as the serving model counts them (its tokenizer and chat template,
        which only a runner holds): a one-token chat, whose usage is the answer."""
        req = parse_messages(await request.body(), self.api.config.max_tokens_limit, count_only=True)
        gateway = self.api.gw
        answered = await base.whole(request, gateway, await base.route(gateway, req))
        if answered is None:
            return base.gone()
        return base.json_response({"input_tokens": base.tokens(answered[1])[0]})


class _Blocks:
    """The stream's content blocks as the answer's pieces open them: one open at a time, stopped
    before the next starts (Anthropic's order); a text block, then each call's tool_use block."""

    def __init__(self) -> None:
        self.count = 0
        self.open: int | None = None
        self.text_at: int | None = None
        # The block of each call of the answer (its index among the calls).
        self.calls: dict[int, int] = {}

    def _start(self, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self.stop()
        self.open, self.count = self.count, self.count + 1
        yield {"type": "content_block_start", "index": self.open, "content_block": block}

    def stop(self) -> Iterator[dict[str, Any]]:
        if self.open is not None:
            yield {"type": "content_block_stop", "index": self.open}
            self.open = None

    def text(self, text: str) -> Iterator[dict[str, Any]]:
        if self.text_at is None or self.text_at != self.open:
            yield from self._start({"type": "text", "text": ""})
            self.text_at = self.open
        if text:
            yield {"type": "content_block_delta", "index": self.text_at, "delta": {"type": "text_delta", "text": text}}

    def call(self, piece: ToolCallDelta) -> Iterator[dict[str, Any]]:
        if piece.index not in self.calls:
            block = {"type": "tool_use", "id": tool_use_id(piece.id or ""), "name": piece.name or "", "input": {}}
            yield from self._start(block)
            self.calls[piece.index] = self.count - 1
        if piece.arguments:
            delta = {"type": "input_json_delta", "partial_json": piece.arguments}
            yield {"type": "content_block_delta", "index": self.calls[piece.index], "delta": delta}


async def _events(chat_id: str, req: ChatRequest, pieces: AsyncIterator[base.CallPiece]) -> AsyncIterator[bytes]:
    def event(data: dict[str, Any]) -> bytes:
        return base.sse(data, data["type"])

    message: dict[str, Any] = {
        "id": chat_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # The prompt's tokens are known once the chat ends: message_delta carries them.
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    blocks = _Blocks()
    yield event({"type": "message_start", "message": message})
    if not _has_tools(req):
        # Anthropic's order for a text answer: its block starts before the ping. A chat with tools
        # opens blocks as its answer begins one (it may begin with a call).
        for data in blocks.text(""):
            yield event(data)
    yield event({"type": "ping"})
    async for piece in pieces:
        if isinstance(piece, str | ChoiceDelta):
            text = piece if isinstance(piece, str) else piece.text
            for data in blocks.text(text) if text else ():
                yield event(data)
        elif isinstance(piece, ToolCallDelta):
            for data in blocks.call(piece):
                yield event(data)
        elif isinstance(piece, ApiError):
            yield event(msgspec.json.decode(error_response(piece).body))
        else:
            stop_reason, stop_sequence = _stop(req, piece)
            for data in blocks.stop():
                yield event(data)
            yield event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": _usage(piece),
                }
            )
            yield event({"type": "message_stop"})


def routes(api: Api) -> list[Route]:
    messages = Messages(api)
    return [
        Route("/v1/messages", messages.create, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
    ]
