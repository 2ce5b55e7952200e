"""OpenAI's Responses API, stateless: `POST /v1/responses`.

`input` (text, or messages) and `instructions` become the same routed chat as the chat
completions route's (`dialect_base`); the answer is a `response` holding one assistant
message, or streamed as the Responses events (`response.created` ... `response.completed`).
Nothing is stored: `store: true`, `previous_response_id` and `conversation` are refused by
name, as are tools, reasoning and non-text formats. Unknown fields are refused as OpenAI
refuses them; errors are OpenAI's shape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api import request_rules as rules
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError, bad_request
from exojet.api.json_body import decode_object
from exojet.bus.chat_ends import Ended
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage

if TYPE_CHECKING:
    from exojet.api.app import Api

STATELESS = "exojet's Responses API is stateless: send the whole conversation in `input`"
TOOLS = "tools are not supported yet (tool calls are a later issue)"
REFUSED = {
    "store": STATELESS,
    "previous_response_id": STATELESS,
    "conversation": STATELESS,
    "tools": TOOLS,
    "tool_choice": TOOLS,
    "reasoning": "reasoning is not supported",
    "include": "no extra output can be included",
    "background": "background responses are not supported",
    "prompt": "prompt templates are not supported",
    "top_logprobs": "logprobs are not supported",
    "image": "images are not supported",
    "moderation": "moderation is not supported",
    "context_management": "context management is not supported",
    "access_programs": "access programs are not supported",
    "background_options": "background responses are not supported",
}
# OpenAI's own lower bound for max_output_tokens.
MIN_OUTPUT_TOKENS = 16
TOOL_ITEMS = ("function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output")


class Part(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's, sent back as it came


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    type: Literal["message"] = "message"
    # An earlier answer's message, sent back as it came.
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class TextFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["text"]


class TextOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | Annotated[list[Item], msgspec.Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=MIN_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stream: bool = False
    # Plain text, the only output there is.
    text: TextOptions | None = None
    # Accepted, changing nothing: echoed, or hints about caching, tiers, tools that are not there.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None


RULES: dict[type, tuple[rules.Rule, ...]] = {ResponsesBody: (rules.STREAM_OPTIONS,)}


def _refuse_items(data: dict[str, Any]) -> None:
    """ApiError(400) naming the first item of `input` that is not a text message (a tool call or
    result, an image, a file), before the struct would call it only a wrong value."""
    items = data.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind in TOOL_ITEMS:
            raise bad_request(f"input[{i}]: {TOOLS}", param=f"input[{i}].type", code="unsupported_parameter")
        if kind != "message":
            raise bad_request(f"input[{i}].type: only messages are supported, not {kind!r}", param=f"input[{i}].type")
        parts = item.get("content") if isinstance(item, dict) else None
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            if isinstance(part, dict) and part.get("type") not in ("input_text", "output_text"):
                where = f"input[{i}].content[{j}].type"
                raise bad_request(f"{where}: only text is supported, not {part.get('type')!r}", param=where)


def _message(item: Item) -> ChatMessage:
    text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
    # `developer` is OpenAI's newer name for system, which chat templates know.
    return ChatMessage("system" if item.role == "developer" else item.role, text)


def _parse(raw: bytes, limit: int) -> tuple[ResponsesBody, ChatRequest]:
    data = decode_object(raw)
    _refuse_items(data)
    body = base.strict_body(data, ResponsesBody, REFUSED, lambda name: f"Unknown parameter: '{name}'.")
    rules.check(RULES[ResponsesBody], body)
    max_tokens = base.answer_length(body.max_output_tokens, "max_output_tokens", limit)
    messages = [ChatMessage("system", body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        messages.append(ChatMessage("user", body.input))
    else:
        messages += [_message(item) for item in body.input]
    req = ChatRequest(
        model=body.model,
        messages=tuple(messages),
        stream=body.stream,
        include_usage=True,
        sampling=Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p),
    )
    return body, req


class Shape:
    """A response's JSON as it goes: in progress, then completed (or incomplete, or failed)."""

    def __init__(self, chat_id: str, body: ResponsesBody) -> None:
        self.id = chat_id
        self.message_id = "msg_" + chat_id.removeprefix("chat-")
        self.body = body
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.body.model,
            "output": output,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "temperature": self.body.temperature,
            "top_p": self.body.top_p,
            "metadata": self.body.metadata or {},
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "store": False,
            "previous_response_id": None,
            "error": None,
            "incomplete_details": None,
            "usage": None,
        } | more

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        """The answer's message; None: no text yet (its content is empty)."""
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def ended(self, text: str, outcome: Ended) -> dict[str, Any]:
        prompt, completion = base.tokens(outcome)
        cut = base.finish_reason(outcome) == "length"
        status = "incomplete" if cut else "completed"
        return self.response(
            status,
            [self.message(text, status)],
            completed_at=int(time.time()),
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
            usage={
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        )


async def _events(shape: Shape, pieces: AsyncIterator[base.Piece]) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, **data: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return base.sse({"type": kind, "sequence_number": sequence - 1, **data}, kind)

    at = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response("in_progress", []))
    yield event("response.in_progress", response=shape.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=shape.message(None, "in_progress"))
    yield event("response.content_part.added", **at, part={"type": "output_text", "text": "", "annotations": []})
    said = []
    async for piece in pieces:
        if isinstance(piece, str):
            said.append(piece)
            yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
        elif isinstance(piece, ApiError):
            yield event("error", code=piece.code, message=piece.message, param=piece.param)
            failed = {"code": piece.code or "server_error", "message": piece.message}
            yield event("response.failed", response=shape.response("failed", [], error=failed))
        else:
            text = "".join(said)
            done = shape.ended(text, piece)
            item = done["output"][0]
            yield event("response.output_text.done", **at, text=text, logprobs=[])
            yield event("response.content_part.done", **at, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(f"response.{'completed' if done['status'] == 'completed' else 'incomplete'}", response=done)


class Responses:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        body, req = _parse(await request.body(), self.api.config.max_tokens_limit)
        return await base.respond(
            request,
            self.api.gw,
            req,
            lambda chat_id, pieces: _events(Shape(chat_id, body), pieces),
            lambda chat_id, text, outcome: Shape(chat_id, body).ended(text, outcome),
        )


def routes(api: Api) -> list[Route]:
    return [Route("/v1/responses", Responses(api).create, methods=["POST"])]
