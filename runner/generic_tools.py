"""Tool calls for a model whose chat template knows no tools, and calls that must be made.

llama.cpp's server used to give such a model a generic tool prompt (as Ollama does); its
autoparser (2026) drops the tools of a template that does not render them, and it constrains a
required call only where it recognised the template's own tool syntax. So exojet does what the
generic format did, the same way on every engine: the tools are described in a system message,
the answer is constrained by a JSON schema to `{"tool_calls": [{"name", "arguments"}, ...]}`
(or, when the model may also answer in words, `{"response": "..."}`), and the calls are read
back from that JSON. Pure functions, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from exojet.bus.tools import JsonSchema, Tool, ToolCall, ToolCallDelta, ToolChoice, must_call
from exojet.runner.engine_backend import Emit

RESPONSE_KEY = "response"


def calls_schema(tools: tuple[Tool, ...], required: bool, parallel: bool) -> JsonSchema:
    """The JSON schema of a generic answer calling `tools` (or answering in words unless `required`)."""
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    calls: JsonSchema = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    tool_calls: JsonSchema = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if required:
        return tool_calls
    words = {
        "type": "object",
        "properties": {RESPONSE_KEY: {"type": "string"}},
        "required": [RESPONSE_KEY],
        "additionalProperties": False,
    }
    return {"anyOf": [tool_calls, words]}


def system_prompt(tools: tuple[Tool, ...], required: bool) -> str:
    """The generic tool prompt: the tools, then the one answer shape the grammar allows."""
    listed = "\n".join(json.dumps(msgspec.to_builtins(t.function)) for t in tools)
    shape = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
    words = "" if required else f', or {{"{RESPONSE_KEY}": "<your answer>"}} to answer without a tool'
    return f"You can call these tools:\n{listed}\nAnswer with one JSON object: {shape} to call tools{words}."


def uses_generic(template_has_tools: bool, choice: ToolChoice | None) -> bool:
    """Whether a chat with tools takes the generic path: its template renders no tools, or the
    answer must be calls (which only the generic schema constrains on every template)."""
    return not template_has_tools or must_call(choice)


class _Call(msgspec.Struct):
    name: str
    arguments: Any


class _Answer(msgspec.Struct):
    tool_calls: list[_Call] = []
    response: str | None = None


def read_answer(text: str, call_id: str) -> tuple[str, list[ToolCall]]:
    """The words and the calls of a generic answer (`call_id`-0, -1, ... name the calls); a text
    that is not such JSON (an answer cut short) is words."""
    try:
        answer = msgspec.json.decode(text, type=_Answer)
    except msgspec.DecodeError:
        return text, []
    calls = [
        ToolCall(id=f"{call_id}-{i}", name=c.name, arguments=json.dumps(c.arguments))
        for i, c in enumerate(answer.tool_calls)
    ]
    return answer.response or "", calls


def call_ids(request_id: int, started: float) -> str:
    """The stem of a generation's call ids (its calls are `<stem>-0`, `-1`, ...): unique per
    generation of an engine child, whose request ids restart with it."""
    return f"call-{request_id}-{started:.6f}"


def emit_calls(calls: list[ToolCall], emit: Emit | None, first: int = 0) -> None:
    """Send whole calls as one piece each (indexed from `first`)."""
    if emit is not None:
        for i, call in enumerate(calls, start=first):
            emit(ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments))


def emit_answer(text: str, call_id: str, emit: Emit | None) -> tuple[str, list[ToolCall]]:
    """Read a generic answer whole at its end and send its words, then its calls."""
    words, calls = read_answer(text, call_id)
    if emit is not None and words:
        emit(words)
    emit_calls(calls, emit)
    return words, calls
