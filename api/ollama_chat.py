"""What Ollama's `/api/chat` and `/api/generate` read beyond text, as the routed chat takes it, and
the tool calls of its answer as Ollama gives them.

- `tools`: functions with a JSON-schema `parameters` (OpenAI's shape, `type` may be left out);
- the history: an assistant message's `tool_calls` (`arguments` an object, an `id` optional) and
  `role: tool` results (`tool_name`, and `tool_call_id` from newer clients), as the same fields
  the OpenAI route routes (`ChatMessage.tool_calls` with ids, `tool_call_id`): a call without an id
  is given one, and a result without `tool_call_id` answers the first unanswered call of its
  `tool_name` (of any name when it gives none) in the assistant message before it;
- `format`: `"json"` (any JSON object) or a JSON schema, the routed chat's `response_format`,
  enforced by the same grammar-constrained decoding; `""` or null asks for none, as Ollama reads it.

Answers: a call's `arguments` are an object, each call whole in one streamed line, and a chat
that called tools is `done_reason: stop`, as Ollama's server answers; one call an answer (`shape`).
Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from loguru import logger

from exojet.api.dialect_base import CallPiece
from exojet.api.errors import ApiError
from exojet.api.request_rules import check_tools
from exojet.bus.chat_ends import Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import (
    AnswerShape,
    FunctionDef,
    JsonSchema,
    JsonSchemaFormat,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    join_deltas,
)

# A request's `format`: "json", a JSON schema, or nothing ("" and null, as Ollama reads them).
Format = Literal["", "json"] | JsonSchema | None
# The name a `format` schema is routed under (OpenAI's json_schema needs one; Ollama's has none).
FORMAT_NAME = "format"


class InFunction(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str | None = None
    parameters: JsonSchema | None = None


class InTool(msgspec.Struct, frozen=True):
    function: InFunction
    type: Literal["function"] = "function"


class CallFunction(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    arguments: dict[str, Any] = {}
    index: int | None = None  # the call's place in its answer (the list's order says it)


class InCall(msgspec.Struct, frozen=True):
    function: CallFunction
    id: Annotated[str, msgspec.Meta(min_length=1)] | None = None


class Message(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[InCall] | None = None
    # A tool's result: the tool it came from, and (newer clients) the call it answers.
    tool_name: str | None = None
    tool_call_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    # Refused when it asks for anything (`MESSAGE_REFUSED`).
    images: Any = None


# A message's fields refused when they ask for anything.
MESSAGE_REFUSED = ("images",)


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    """`messages` as the routed chat's, each call with an id and each tool result with the id of
    the call it answers (when one is there to answer)."""
    out = []
    unanswered: list[ToolCall] = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            calls = tuple(_call(i, j, c) for j, c in enumerate(m.tool_calls))
            unanswered = list(calls)
            out.append(ChatMessage(m.role, m.content, tool_calls=calls))
        elif m.role == "tool":
            out.append(ChatMessage(m.role, m.content, tool_call_id=_answers(unanswered, m)))
        else:
            out.append(ChatMessage(m.role, m.content))
    return out


def _call(message: int, index: int, call: InCall) -> ToolCall:
    arguments = msgspec.json.encode(call.function.arguments).decode()
    # An id unique in the chat: the message's place and the call's.
    return ToolCall(id=call.id or f"call_{message}_{index}", name=call.function.name, arguments=arguments)


def _answers(unanswered: list[ToolCall], result: Message) -> str | None:
    """The id of the call `result` answers (taken from `unanswered`): the one its `tool_call_id`
    names, else the first of its `tool_name` (of any name when it gives none); None when none is."""
    for call in unanswered:
        if call.id == result.tool_call_id or (
            result.tool_call_id is None and result.tool_name in (None, "", call.name)
        ):
            unanswered.remove(call)
            return call.id
    return result.tool_call_id


def response_format(fmt: Format) -> ResponseFormat | None:
    """`format` as the routed chat's `response_format` (None: free text)."""
    if not fmt:
        return None
    if fmt == "json":
        return ResponseFormat(type="json_object")
    assert isinstance(fmt, dict), "the body's struct admits a dict or its literals"
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name=FORMAT_NAME, schema=fmt, strict=True))


def shape(tools: list[InTool] | None, fmt: Format) -> AnswerShape:
    """The answer shape of a chat with `tools` (Ollama's: the model may call them) and `format`;
    ApiError(400) when two tools share a name (`request_rules.check_tools`)."""
    routed = tuple(
        Tool(
            type="function",
            function=FunctionDef(
                name=t.function.name, description=t.function.description, parameters=t.function.parameters
            ),
        )
        for t in tools or ()
    )
    # One call an answer, as llama.cpp's server defaults (Ollama's API has no parallel_tool_calls):
    # on the generic path SmolLM2 called its tool again and again until the answer's length.
    answer = AnswerShape(
        tools=routed, parallel_tool_calls=False if routed else None, response_format=response_format(fmt)
    )
    check_tools(answer)
    return answer


def call_json(index: int, call: ToolCall) -> dict[str, Any] | None:
    """A call as Ollama gives it (`arguments` an object); None for one whose arguments are no
    JSON object (a call cut short by the answer's length), which Ollama's parser would not give."""
    try:
        arguments = msgspec.json.decode(call.arguments)
    except msgspec.DecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        logger.bind(component="api", call=call.id).warning(f"tool call {call.name!r} dropped: arguments not an object")
        return None
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


def calls_json(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """An answer's `calls` as Ollama gives them, less those with no object of arguments."""
    rendered = (call_json(i, c) for i, c in enumerate(calls))
    return [c for c in rendered if c is not None]


def done_reason(finish_reason: str) -> str:
    """Ollama's `done_reason`: a chat that called tools stopped (Ollama has no `tool_calls` reason)."""
    return "stop" if finish_reason == "tool_calls" else finish_reason


# What a streamed chat says, as Ollama's lines have it: text, a whole call (`call_json`), its end.
Said = str | dict[str, Any] | Ended | ApiError


async def whole_calls(pieces: AsyncIterator[CallPiece]) -> AsyncIterator[Said]:
    """The chat's text as it comes, each tool call once whole as Ollama gives it (its pieces joined
    when the next call begins or the chat ends; one that is no object of arguments dropped), then
    how the chat ended."""
    begun: list[ToolCallDelta] = []

    def joined() -> list[dict[str, Any]]:
        calls = [call_json(begun[0].index, call) for call in join_deltas(begun)] if begun else []
        begun.clear()
        return [c for c in calls if c is not None]

    async for piece in pieces:
        if isinstance(piece, ToolCallDelta):
            if begun and piece.index != begun[-1].index:
                for call in joined():
                    yield call
            begun.append(piece)
        elif isinstance(piece, ChoiceDelta):
            # Ollama asks for one answer (no `n`): its text, were it sent as a ChoiceDelta.
            if piece.choice == 0 and piece.text:
                yield piece.text
        elif isinstance(piece, str):
            yield piece
        else:
            for call in joined():
                yield call
            yield piece
