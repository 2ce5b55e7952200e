"""OpenAI's Responses API, stateless: `POST /v1/responses`.

The request (`responses_request.py`) becomes the same routed chat as the chat completions route's
(`dialect_base`); the answer is a `response` whose output is the assistant's message and its
`function_call` items, or streamed as the Responses events (`response.created` ... one output item
at a time, each added, its text or arguments in deltas, done ... `response.completed`). Errors are
OpenAI's shape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api.errors import ApiError
from exojet.api.responses_request import ResponsesBody, parse_responses
from exojet.bus.chat_ends import Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.tools import ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from exojet.api.app import Api

# An item's status while it is streamed, and once done (incomplete: the answer was cut).
IN_PROGRESS = "in_progress"


class Shape:
    """A response's JSON as it goes: in progress, then completed (or incomplete, or failed)."""

    def __init__(self, chat_id: str, body: ResponsesBody) -> None:
        self.id = chat_id
        self.suffix = chat_id.removeprefix("chat-")
        self.body = body
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body.model,
            "output": output,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "metadata": body.metadata or {},
            # The runner's default, as OpenAI's: calls in parallel unless asked otherwise.
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": msgspec.to_builtins(body.tool_choice or "auto"),
            "tools": msgspec.to_builtins(body.tools or []),
            "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
            "store": False,
            "previous_response_id": None,
            "error": None,
            "incomplete_details": None,
            "usage": None,
        } | more

    def message_id(self, nth: int = 0) -> str:
        """The id of the answer's `nth` message (a stream opens another when words follow a call)."""
        return f"msg_{self.suffix}" + (f"_{nth}" if nth else "")

    def message(self, text: str | None, status: str, nth: int = 0) -> dict[str, Any]:
        """The answer's message; None: no text yet (its content is empty)."""
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "id": self.message_id(nth),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def call(self, index: int, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        """The answer's `index`th function call as an output item (its id the same whole and streamed)."""
        return {
            "id": f"fc_{self.suffix}_{index}",
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }

    def ended(self, text: str, outcome: Ended) -> dict[str, Any]:
        """The whole answer: its message when it said words (always without calls), then its calls."""
        status = _status(outcome)
        calls: tuple[ToolCall, ...] = outcome.result.tool_calls
        output = [self.message(text, status)] if text or not calls else []
        output += [self.call(i, c.id, c.name, c.arguments, status) for i, c in enumerate(calls)]
        return self.done(output, outcome)

    def done(self, output: list[dict[str, Any]], outcome: Ended) -> dict[str, Any]:
        prompt, completion = base.tokens(outcome)
        status = _status(outcome)
        return self.response(
            status,
            output,
            completed_at=int(time.time()),
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            usage={
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        )


def _status(outcome: Ended) -> str:
    return "incomplete" if base.finish_reason(outcome) == "length" else "completed"


# A stream's event before its sequence number: its type and its fields.
Event = tuple[str, dict[str, Any]]


class _Items:
    """The stream's output items as the answer's pieces open them: one open at a time, done before
    the next is added (OpenAI's order); a message while the answer says words, a function_call item
    for each call, its arguments in deltas."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.output: list[dict[str, Any]] = []
        self.open: int | None = None
        self.texts: dict[int, list[str]] = {}
        # The output index of each call of the answer (by its index among the calls).
        self.calls: dict[int, int] = {}

    def _add(self, item: dict[str, Any]) -> Iterator[Event]:
        yield from self.close(IN_PROGRESS)
        self.open = len(self.output)
        self.output.append(item)
        yield "response.output_item.added", {"output_index": self.open, "item": item}

    def text(self, text: str) -> Iterator[Event]:
        if self.open is None or self.output[self.open]["type"] != "message":
            yield from self._add(self.shape.message(None, IN_PROGRESS, nth=len(self.texts)))
            assert self.open is not None
            self.texts[self.open] = []
            part = {"type": "output_text", "text": "", "annotations": []}
            yield "response.content_part.added", self._at(self.open) | {"part": part}
        if text:
            self.texts[self.open].append(text)
            yield "response.output_text.delta", self._at(self.open) | {"delta": text, "logprobs": []}

    def call(self, piece: ToolCallDelta) -> Iterator[Event]:
        if piece.index not in self.calls:
            item = self.shape.call(piece.index, piece.id or "", piece.name or "", "", IN_PROGRESS)
            yield from self._add(item)
            assert self.open is not None
            self.calls[piece.index] = self.open
        at = self.calls[piece.index]
        if piece.arguments:
            # A piece of a call already done (the rest of its arguments filled from the chat's result
            # after a later item began) still goes to its item.
            self.output[at]["arguments"] += piece.arguments
            yield "response.function_call_arguments.delta", self._item(at) | {"delta": piece.arguments}

    def close(self, status: str) -> Iterator[Event]:
        """The open item done: `status` completed or incomplete (IN_PROGRESS: the next item's
        beginning closes it, completed)."""
        at, self.open = self.open, None
        if at is None:
            return
        status = "completed" if status == IN_PROGRESS else status
        item = self.output[at]
        if item["type"] == "message":
            text = "".join(self.texts[at])
            item = self.output[at] = self.shape.message(text, status, nth=list(self.texts).index(at))
            yield "response.output_text.done", self._at(at) | {"text": text, "logprobs": []}
            yield "response.content_part.done", self._at(at) | {"part": item["content"][0]}
        else:
            item["status"] = status
            yield "response.function_call_arguments.done", self._item(at) | {"arguments": item["arguments"]}
        yield "response.output_item.done", {"output_index": at, "item": item}

    def _item(self, at: int) -> dict[str, Any]:
        return {"item_id": self.output[at]["id"], "output_index": at}

    def _at(self, at: int) -> dict[str, Any]:
        return self._item(at) | {"content_index": 0}


async def _events(shape: Shape, pieces: AsyncIterator[base.CallPiece]) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, data: dict[str, Any]) -> bytes:
        nonlocal sequence
        sequence += 1
        return base.sse({"type": kind, "sequence_number": sequence - 1, **data}, kind)

    items = _Items(shape)
    yield event("response.created", {"response": shape.response(IN_PROGRESS, [])})
    yield event("response.in_progress", {"response": shape.response(IN_PROGRESS, [])})
    if not shape.body.tools:
        # A text answer's message opens at once, as before tools; with tools the first piece opens
        # the first item (an answer may begin with a call).
        for kind, data in items.text(""):
            yield event(kind, data)
    async for piece in pieces:
        if isinstance(piece, str | ChoiceDelta):
            text = piece if isinstance(piece, str) else piece.text
            for kind, data in items.text(text) if text else ():
                yield event(kind, data)
        elif isinstance(piece, ToolCallDelta):
            for kind, data in items.call(piece):
                yield event(kind, data)
        elif isinstance(piece, ApiError):
            yield event("error", {"code": piece.code, "message": piece.message, "param": piece.param})
            failed = {"code": piece.code or "server_error", "message": piece.message}
            yield event("response.failed", {"response": shape.response("failed", [], error=failed)})
        else:
            # An answer with neither words nor calls still has its (empty) message, as whole.
            for kind, data in items.text("") if not items.output else ():
                yield event(kind, data)
            for kind, data in items.close(_status(piece)):
                yield event(kind, data)
            done = shape.done(items.output, piece)
            yield event(f"response.{done['status']}", {"response": done})


class Responses:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        body, req = parse_responses(await request.body(), self.api.config.max_tokens_limit)
        return await base.respond(
            request,
            self.api.gw,
            req,
            lambda chat_id, pieces: _events(Shape(chat_id, body), pieces),
            None,
            call_events=lambda chat_id, pieces: _events(Shape(chat_id, body), pieces),
            said_reply=lambda chat_id, said, outcome: Shape(chat_id, body).ended(base.said_text(said), outcome),
        )


def routes(api: Api) -> list[Route]:
    return [Route("/v1/responses", Responses(api).create, methods=["POST"])]
