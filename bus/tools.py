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
