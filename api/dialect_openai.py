"""OpenAI's chat completions: `POST /v1/chat/completions`, whole or as server-sent chunks.

The request is validated by `chat_request.py`; the chat is routed and read through
`dialect_base`, as every other dialect's is. Errors are OpenAI's own shape (`errors.py`);
one after a stream began is a `data: {"error": ...}` event, then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api.chat_request import ChatRequest, parse_chat
from exojet.api.errors import ApiError
from exojet.bus.chat_ends import Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.logprobs import TokenLogprob
from exojet.bus.sampling import choices
from exojet.bus.tools import ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from exojet.api.app import Api

DONE = b"data: [DONE]\n\n"


def usage(outcome: Ended) -> dict[str, int]:
    prompt, completion = base.tokens(outcome)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Chat:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        req = parse_chat(await request.body(), self.api.config.max_tokens_limit)
        return await base.respond(
            request,
            self.api.gw,
            req,
            lambda chat_id, pieces: _events(chat_id, req, pieces),
            None,
            call_events=lambda chat_id, pieces: _events(chat_id, req, pieces),
            said_reply=lambda chat_id, said, outcome: _completion(chat_id, req, said, outcome),
        )


def _message(text: str, outcome: Ended) -> dict[str, Any]:
    """The answer's message: its calls, with content null when it said nothing else (OpenAI's shape)."""
    calls = outcome.result.tool_calls
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": [_call(c) for c in calls]}


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """A streamed piece of a call: its index, then (the first time) its id and name, its arguments' fragment."""
    out: dict[str, Any] = {"index": piece.index}
    if piece.id is not None:
        out |= {"id": piece.id, "type": "function"}
    function: dict[str, str] = {"arguments": piece.arguments}
    if piece.name is not None:
        function["name"] = piece.name
    return out | {"function": function}


def _token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes())}


def _logprobs(req: ChatRequest, tokens: list[TokenLogprob]) -> dict[str, Any] | None:
    """A choice's `logprobs` (null unless the request asked for them)."""
    if not req.sampling.logprobs:
        return None
    return {"content": [_token(t) | {"top_logprobs": [_token(top) for top in t.top]} for t in tokens], "refusal": None}


def _finish_reasons(outcome: Ended) -> list[str]:
    """Each answer's finish reason, choice 0 first."""
    return [base.finish_reason(outcome), *(c.finish_reason for c in outcome.result.choices)]


def _completion(chat_id: str, req: ChatRequest, said: list[base.Said], outcome: Ended) -> dict[str, Any]:
    n = choices(req.sampling)
    texts: list[list[str]] = [[] for _ in range(n)]
    tokens: list[list[TokenLogprob]] = [[] for _ in range(n)]
    for piece in said:
        delta = piece if isinstance(piece, ChoiceDelta) else ChoiceDelta(text=piece)
        if delta.choice < n:
            texts[delta.choice].append(delta.text)
            tokens[delta.choice].extend(delta.logprobs)
    reasons = _finish_reasons(outcome)
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": _message("".join(texts[i]), outcome)
                if i == 0
                else {"role": "assistant", "content": "".join(texts[i])},
                "finish_reason": reasons[i] if i < len(reasons) else "cancelled",
                "logprobs": _logprobs(req, tokens[i]),
            }
            for i in range(n)
        ],
        "usage": usage(outcome),
    }


async def _events(chat_id: str, req: ChatRequest, pieces: AsyncIterator[base.CallPiece]) -> AsyncIterator[bytes]:
    head = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": None,
    }
    tail: dict[str, Any] = {"usage": None} if req.include_usage else {}

    def choice(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0, logprobs: Any = None) -> bytes:
        part = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        return base.sse({**head, "choices": [part]} | tail)

    for index in range(choices(req.sampling)):
        yield choice({"role": "assistant", "content": ""}, index=index)
    async for piece in pieces:
        if isinstance(piece, str):
            yield choice({"content": piece})
        elif isinstance(piece, ChoiceDelta):
            yield choice({"content": piece.text}, index=piece.choice, logprobs=_logprobs(req, list(piece.logprobs)))
        elif isinstance(piece, ToolCallDelta):
            yield choice({"tool_calls": [_call_delta(piece)]})
        elif isinstance(piece, ApiError):
            yield base.sse(piece.body())
        else:
            for index, reason in enumerate(_finish_reasons(piece)):
                yield choice({}, reason, index=index)
            if req.include_usage:
                yield base.sse({**head, "choices": [], "usage": usage(piece)})
    yield DONE


def routes(api: Api) -> list[Route]:
    return [Route("/v1/chat/completions", Chat(api).create, methods=["POST"])]
