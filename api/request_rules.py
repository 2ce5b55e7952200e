"""Rules between a request's fields, each stated once: the parser checks them (`check`) and
/openapi.json states them (`schema`, a JSON Schema `if`/`then`), so a schema-driven client, and
schemathesis, keep to what the parser accepts.

A rule reads: when every field of `when` meets its condition, every field of `then` must meet its
own, else a 400 naming `param`. A field left out is a field at None, as in the request structs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exojet.api.errors import bad_request
from exojet.bus.tools import AnswerShape, NamedToolChoice


@dataclass(frozen=True)
class Cond:
    """A condition on one field's value: its JSON Schema and the same test in Python."""

    schema: dict[str, Any]
    test: Callable[[Any], bool]


def one_of(*values: object) -> Cond:
    return Cond({"enum": list(values)}, lambda v: v in values)


def not_(cond: Cond) -> Cond:
    return Cond({"not": cond.schema}, lambda v: not cond.test(v))


NULL = one_of(None)
GIVEN = not_(NULL)
NON_EMPTY = Cond({"type": "array", "minItems": 1}, lambda v: isinstance(v, list | tuple) and len(v) > 0)


def where(name: str, cond: Cond) -> Cond:
    """A condition on a field of an object (a struct in Python, absent fields at None)."""
    return Cond(
        {"type": "object", **_object({name: cond})},
        lambda v: v is not None and cond.test(getattr(v, name, None)),
    )


def _object(conds: dict[str, Cond]) -> dict[str, Any]:
    # A field whose condition None fails must be present (JSON Schema's `properties` skips absent ones).
    required = [name for name, cond in conds.items() if not cond.test(None)]
    return {"properties": {name: cond.schema for name, cond in conds.items()}} | (
        {"required": required} if required else {}
    )


@dataclass(frozen=True)
class Rule:
    when: dict[str, Cond]
    then: dict[str, Cond]
    param: str
    message: str
    code: str = "invalid_value"

    def schema(self) -> dict[str, Any]:
        return {"if": _object(self.when), "then": _object(self.then)}

    def broken_by(self, body: object) -> bool:
        def meets(conds: dict[str, Cond]) -> bool:
            return all(cond.test(getattr(body, name, None)) for name, cond in conds.items())

        return meets(self.when) and not meets(self.then)


def asks(value: Any) -> bool:
    """Whether a field's value asks for anything: null, false and empty values do not."""
    return not (value is None or value is False or (isinstance(value, str | list | dict) and not value))


def refuse(data: dict[str, Any], refused: Mapping[str, str], at: str = "") -> dict[str, Any]:
    """`data` less `refused`'s fields when they ask for nothing (null, false or empty: some clients
    send every field, unset ones so); ApiError(400) naming the first of them that asks for
    something (its param under `at`), and why, so a client learns what exojet does not do rather
    than being ignored."""
    for name, why in refused.items():
        if asks(data.get(name)):
            raise bad_request(f"{at}{name}: {why}", param=at + name, code="unsupported_parameter")
    return {k: v for k, v in data.items() if k not in refused}


def check_tools(shape: AnswerShape, tools: str = "tools", choice: str = "tool_choice") -> None:
    """ApiError(400) when two of `shape`'s tools share a name, or its tool choice names none of them:
    two rules no JSON Schema can state, the same in every dialect (`tools`, `choice`: the params
    named, in the dialect's words)."""
    names = {t.function.name for t in shape.tools}
    if len(names) < len(shape.tools):
        raise bad_request(f"{tools}: two tools have the same name", param=tools, code="invalid_value")
    named = shape.tool_choice
    if isinstance(named, NamedToolChoice) and named.function.name not in names:
        raise bad_request(f"{choice} names {named.function.name!r}, which is not among the tools", param=choice)


def check(rules: Sequence[Rule], body: object, at: str = "") -> None:
    """ApiError(400) naming the first of `rules` that `body` breaks (its param under `at`)."""
    for rule in rules:
        if rule.broken_by(body):
            raise bad_request(rule.message, param=at + rule.param, code=rule.code)


def stated(schema: dict[str, Any], rules: Sequence[Rule]) -> dict[str, Any]:
    """`schema` (an object's) with `rules` stated in it."""
    return schema | {"allOf": [r.schema() for r in rules]} if rules else schema


# vLLM answers 400 to stream_options without stream (OpenAI's clients send it only with stream).
STREAM_OPTIONS = Rule(
    when={"stream_options": GIVEN},
    then={"stream": one_of(True)},
    param="stream_options",
    message="stream_options is only allowed when stream is true",
)

# OpenAI's chat completions and Responses: a tool choice other than none needs tools to choose from.
CHOICE_NEEDS_TOOLS = Rule(
    when={"tool_choice": not_(one_of(None, "none"))},
    then={"tools": NON_EMPTY},
    param="tool_choice",
    message="tool_choice is only allowed when tools are given",
)
