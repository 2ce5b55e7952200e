"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A request becomes the same routed chat as OpenAI's (`dialect_base`); the answer goes
back as a `message`, or streamed as Anthropic's named events. Errors are
`{"type": "error", "error": {"type", "message"}}`. As Anthropic's service does, an
unknown field is refused ("Extra inputs are not permitted"); fields exojet does not
do yet (tools, thinking, top_k, ...) are refused by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError, bad_request
from exojet.api.json_body import decode_object
from exojet.bus.chat_ends import Ended
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage

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
TOOLS = "tools are not supported yet (tool calls are a later issue)"
REFUSED = {
    "tools": TOOLS,
    "tool_choice": TOOLS,
    "thinking": "extended thinking is not supported",
    "top_k": "top_k is not supported by exojet's engines",
    "container": "containers are not supported",
    "mcp_servers": "MCP servers are not supported",
    "context_management": "context management is not supported",
}
MAX_STOP_SEQUENCES = 4
# What count_tokens takes besides REFUSED's fields.
COUNT_FIELDS = frozenset(
    ("model", "messages", "system", "cache_control", "output_config", "speed", "user_profile_id", "workspace_id")
)


class TextBlock(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str
    # Prompt caching hints (Claude Code sends them): nothing to cache here.
    cache_control: dict[str, Any] | None = None
    citations: None = None


# Text alone (other blocks are refused by name first, `_refuse_blocks`).
Content = str | list[TextBlock]


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: Content


class OutputConfig(msgspec.Struct, frozen=True):
    # Its `effort` (and any other hint) changes nothing here; a `format` is refused by name first.
    format: None = None


Text = Annotated[str, msgspec.Meta(min_length=1)]


class MessagesBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Text
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    system: Content | None = None
    stop_sequences: Annotated[list[Text], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    # Accepted, changing nothing: the caller's metadata, prompt caching hints, Anthropic's
    # capacity tiers, speed and region choices, and who is asking.
    metadata: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    output_config: OutputConfig | None = None


def error_response(err: ApiError) -> Response:
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}
    return base.json_response(body, err.status, err.headers)


def _refuse_blocks(data: dict[str, Any]) -> None:
    """ApiError(400) naming the first block that is not text (tools', images, documents) and a
    structured output format, by name, before the struct would call them only wrong values."""
    config = data.get("output_config")
    if isinstance(config, dict) and config.get("format") is not None:
        raise bad_request("output_config.format: structured output is not supported yet", param="output_config.format")
    messages = data.get("messages")
    contents = [("system", data.get("system"))] + [
        (f"messages.{i}.content", m.get("content"))
        for i, m in enumerate(messages if isinstance(messages, list) else ())
        if isinstance(m, dict)
    ]
    for where, content in contents:
        for i, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in ("tool_use", "tool_result"):
                raise bad_request(f"{where}.{i}: {kind} blocks: {TOOLS}", param=f"{where}.{i}.type", code="unsupported")
            if kind != "text":
                raise bad_request(
                    f"{where}.{i}.type: only text blocks are supported, not {kind!r}", param=f"{where}.{i}.type"
                )


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _parse(raw: bytes, limit: int, count_only: bool = False) -> ChatRequest:
    data = decode_object(raw)
    if count_only:
        # count_tokens takes the prompt's fields only: it answers no message.
        extra = [k for k in data if k not in COUNT_FIELDS and k not in REFUSED]
        if extra:
            raise bad_request(f"{extra[0]}: Extra inputs are not permitted", param=extra[0])
        data = {**data, "max_tokens": 1}
    _refuse_blocks(data)
    body = base.strict_body(data, MessagesBody, REFUSED, lambda name: f"{name}: Extra inputs are not permitted")
    base.answer_length(body.max_tokens, "max_tokens", limit)
    messages = [ChatMessage("system", _text(body.system))] if body.system else []
    messages += [ChatMessage(m.role, _text(m.content)) for m in body.messages]
    return ChatRequest(
        model=body.model,
        messages=tuple(messages),
        stream=body.stream,
        include_usage=True,
        sampling=Sampling(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop_sequences) if body.stop_sequences else None,
        ),
    )


def _stop(req: ChatRequest, outcome: Ended) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a completed chat."""
    reason = base.finish_reason(outcome)
    if reason == "length":
        return "max_tokens", None
    if isinstance(req.sampling.stop, tuple):
        # The runner's result says a stop string ended it but not which: named when there is one.
        return "stop_sequence", req.sampling.stop[0] if len(req.sampling.stop) == 1 else None
    return "end_turn", None


def _usage(outcome: Ended) -> dict[str, int]:
    prompt, completion = base.tokens(outcome)
    return {"input_tokens": prompt, "output_tokens": completion}


def _message(chat_id: str, req: ChatRequest, text: str, outcome: Ended) -> dict[str, Any]:
    stop_reason, stop_sequence = _stop(req, outcome)
    return {
        "id": chat_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(outcome),
    }


class Messages:
    """The routes' handlers."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        req = _parse(await request.body(), self.api.config.max_tokens_limit)
        return await base.respond(
            request,
            self.api.gw,
            req,
            lambda chat_id, pieces: _events(chat_id, req, pieces),
            lambda chat_id, text, outcome: _message(chat_id, req, text, outcome),
        )

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's tokens as the serving model counts them (its tokenizer and chat template,
        which only a runner holds): a one-token chat, whose usage is the answer."""
        req = _parse(await request.body(), self.api.config.max_tokens_limit, count_only=True)
        gateway = self.api.gw
        answered = await base.whole(request, gateway, await base.route(gateway, req))
        if answered is None:
            return base.gone()
        return base.json_response({"input_tokens": base.tokens(answered[1])[0]})


async def _events(chat_id: str, req: ChatRequest, pieces: AsyncIterator[base.Piece]) -> AsyncIterator[bytes]:
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
    yield event({"type": "message_start", "message": message})
    yield event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    yield event({"type": "ping"})
    async for piece in pieces:
        if isinstance(piece, str):
            yield event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
        elif isinstance(piece, ApiError):
            yield event(msgspec.json.decode(error_response(piece).body))
        else:
            stop_reason, stop_sequence = _stop(req, piece)
            yield event({"type": "content_block_stop", "index": 0})
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
