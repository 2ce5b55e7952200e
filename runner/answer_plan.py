"""How an engine serves a chat's answer shape (tools, `response_format`), the same on every engine.

A chat whose template renders tools gets them through the template, and the engine's own parser
reads the model's tool syntax back; a template without tools, or a call that must be made, takes
runner/generic_tools.py's path. A JSON schema (a `response_format`'s, or the generic path's) is one
LLGuidance grammar text, which llama.cpp takes as its `grammar` (xllamacpp's llama.cpp links
LLGuidance) and MLX compiles into its token masks (runner/mlx_grammar.py). Pure functions, no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from exojet.bus.tools import JsonSchema, ResponseFormat, Tool, must_call, wanted_tools
from exojet.runner import generic_tools
from exojet.runner.engine_backend import RequestError
from exojet.runner.engine_protocol import Generate, Message

# JSON without free whitespace: a model may otherwise spend its whole answer on blanks.
_COMPACT = {"whitespace_flexible": False}


class AnswerPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A chat as its engine is to run it: the messages to render (on the generic path the tool
    prompt first), the tools the template renders, whether the answer is the generic path's
    JSON (read back whole at its end), and the grammar the answer is constrained by (None: free)."""

    messages: tuple[Message, ...]
    template_tools: tuple[Tool, ...] = ()
    generic: bool = False
    grammar: str | None = None


def plan_answer(req: Generate, template_has_tools: bool) -> AnswerPlan:
    """The plan of a (templated) chat on an engine whose template renders tools or not."""
    tools = wanted_tools(req.tools, req.tool_choice)
    if tools and generic_tools.uses_generic(template_has_tools, req.tool_choice):
        required = must_call(req.tool_choice)
        prompt = Message(role="system", content=generic_tools.system_prompt(tools, required))
        return AnswerPlan(
            messages=(prompt, *req.messages),
            generic=True,
            grammar=schema_grammar(generic_tools.calls_schema(tools, required, req.parallel_tool_calls)),
        )
    schema = response_schema(req.response_format)
    return AnswerPlan(
        messages=tuple(req.messages),
        template_tools=tools,
        grammar=None if schema is None else schema_grammar(schema),
    )


def response_schema(response_format: ResponseFormat | None) -> JsonSchema | None:
    """The JSON schema an answer must follow (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema" and response_format.json_schema is not None:
        return response_format.json_schema.schema or {"type": "object"}
    return {"type": "object"}


def schema_grammar(schema: JsonSchema) -> str:
    """The LLGuidance grammar of `schema` (a Lark grammar whose start is the schema's JSON, its
    objects closed), checked: a schema LLGuidance cannot compile is refused before any token."""
    import llguidance

    grammar = "%llguidance {}\nstart: %json " + json.dumps({**closed_objects(schema), "x-guidance": _COMPACT})
    if error := llguidance.LLMatcher.validate_grammar(grammar):
        raise RequestError("InvalidRequest", f"the JSON schema does not compile to a grammar: {error}")
    return grammar


# Where a JSON schema holds schemas: one, a list of them, or a mapping of names to them. Not
# `allOf`: its parts are intersected, and closing each would refuse the keys the others name.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "unevaluatedProperties")
_LIST = ("anyOf", "oneOf", "prefixItems", "items")
_MAPPING = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that names its properties
    and says nothing of others, as llama.cpp's and Ollama's schema grammars read it (vLLM's too).
    JSON Schema allows any other key there, and a grammar that does lets a small model add keys
    until its length runs out: the default model, forced to call a function of two parameters,
    wrote `"type"`, `"description"`, `"unit:"` ... for 100 tokens, and the cut call came as words."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _MAPPING:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    named = "properties" in out or "patternProperties" in out
    if named and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def chat_message(m: Message, generic: bool, arguments: Literal["text", "object"]) -> dict[str, Any]:
    """A message as a chat template takes it; on the generic path calls and their results are
    the JSON the generic prompt speaks. A call's `arguments` stay OpenAI's JSON text ("text",
    llama.cpp's server reads them) or become the object Hugging Face templates render ("object")."""
    if generic and m.tool_calls:
        calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in m.tool_calls]
        return {"role": m.role, "content": json.dumps({"tool_calls": calls})}
    if generic and m.role == "tool":
        return {"role": "user", "content": json.dumps({"tool_response": m.content, "tool_call_id": m.tool_call_id})}
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.name,
                    "arguments": c.arguments if arguments == "text" else json.loads(c.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
