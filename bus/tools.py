"""Tool calls and structured output, declared once for the wire, the runner and the API.

OpenAI's shapes: a tool is a function with a JSON-schema `parameters`; `tool_choice` is
"auto", "none", "required" or a named function; `response_format` asks for any JSON object or
for JSON valid against a schema. A tool call carries its `arguments` as a JSON string, as every
client expects it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

JsonSchema = dict[str, Any]


class FunctionDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # A plain field, not a msgspec tag: OpenAI's `type` may not be left out.
    type: Literal["function"]
    function: FunctionDef


class FunctionName(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    schema: JsonSchema | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ToolCall(msgspec.Struct, frozen=True):
    """One call the model made: `arguments` is a JSON object as text."""

    id: str
    name: str
    arguments: str


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the `index`th tool call of an answer: its id and name come first (once),
    its arguments in fragments that join to the call's `arguments`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def join_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls the deltas of one answer make, in index order."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        id_, name, args = calls.setdefault(d.index, ["", "", ""])
        calls[d.index] = [d.id or id_, d.name or name, args + d.arguments]
    return [ToolCall(id=i, name=n, arguments=a) for _, (i, n, a) in sorted(calls.items())]


def missing_pieces(seen: list[ToolCallDelta], calls: tuple[ToolCall, ...]) -> list[ToolCallDelta]:
    """What of the whole `calls` the pieces `seen` so far did not bring (they came on another stream
    than the chat's end): a call not begun whole, the rest of one begun."""
    had: dict[int, str] = {}
    for piece in seen:
        had[piece.index] = had.get(piece.index, "") + piece.arguments
    out = []
    for index, call in enumerate(calls):
        if index not in had:
            out.append(ToolCallDelta(index=index, id=call.id, name=call.name, arguments=call.arguments))
        elif len(call.arguments) > len(had[index]) and call.arguments.startswith(had[index]):
            out.append(ToolCallDelta(index=index, arguments=call.arguments[len(had[index]) :]))
    return out


def wanted_tools(tools: tuple[Tool, ...], choice: ToolChoice | None) -> tuple[Tool, ...]:
    """The tools the model may call: none with "none", the named one alone with a name."""
    if choice == "none":
        return ()
    if isinstance(choice, NamedToolChoice):
        return tuple(t for t in tools if t.function.name == choice.function.name)
    return tools


def must_call(choice: ToolChoice | None) -> bool:
    """Whether the answer has to be tool calls ("required" or a named function)."""
    return choice == "required" or isinstance(choice, NamedToolChoice)


class AnswerShape(msgspec.Struct, frozen=True, kw_only=True):
    """What a chat's answer may or must be: the tools it may call and how, the format of its text.

    The routed command and the task carry these fields flat (as bus/sampling.py's); this is the
    set as one value, which the API's request carries and `shape_of` reads back from either.
    """

    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


FREE = AnswerShape()


def shape_of(message: Any) -> AnswerShape:
    """The answer-shape fields of a routed command or a task, as one value."""
    return AnswerShape(**{name: getattr(message, name) for name in AnswerShape.__struct_fields__})


def shape_fields(shape: AnswerShape) -> dict[str, Any]:
    """`shape` as keyword arguments of the messages that carry it flat."""
    return {name: getattr(shape, name) for name in AnswerShape.__struct_fields__}
