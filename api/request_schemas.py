"""The JSON Schemas of the request bodies in /openapi.json, generated from the structs each route's
parser decodes into (`msgspec.json.schema_components`), with what the parser checks beside its struct
taken from the parser's own tables: the bound `--max-tokens-limit` sets, the fields accepted only at
their no-op value, the fields refused by name, the rules between fields (`request_rules`).

msgspec states a field's default (`"default": null`); each is a value the parser accepts, so it stays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from exojet.api.json_body import INT_MAX, INT_MIN
from exojet.api.request_rules import Rule, stated

REF = "#/components/schemas/{name}"
NULL = {"type": "null"}
# A field refused by name: present only as a value that asks for nothing (`request_rules.refuse`).
ABSENT = {
    "description": "not supported: any other value is refused by name",
    "anyOf": [
        NULL,
        {"const": False},
        {"const": ""},
        {"type": "array", "maxItems": 0},
        {"type": "object", "maxProperties": 0},
    ],
}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


@dataclass(frozen=True)
class Body:
    """A route's request body: its struct and what its parser checks beside the struct."""

    struct: type
    # The fields the API's --max-tokens-limit bounds.
    lengths: tuple[str, ...] = ()
    # Fields accepted only at the value that changes nothing (or null).
    no_op: Mapping[str, object] = field(default_factory=dict)
    # Fields refused by name, and the schema of the values that are not refused.
    refused: Iterable[str] = ()
    unrefused: dict[str, Any] = field(default_factory=lambda: ABSENT)
    # The rules between fields, by the struct they are of (the body's own, or one it holds).
    rules: Mapping[type, Sequence[Rule]] = field(default_factory=dict)
    # Fields refused by name in a struct the body holds (the values that are not: `unrefused`).
    refused_in: Mapping[type, Iterable[str]] = field(default_factory=dict)


def components(bodies: Mapping[str, Body], limit: int, models: list[str]) -> dict[str, Any]:
    """The component schemas of `bodies` (each named by its key) and of every struct they hold;
    `models` (served now) are the examples of each body's `model`."""
    # What each struct a body holds needs beside its own schema: the schema's changes, in turn.
    changes: list[tuple[type, Callable[[dict[str, Any]], dict[str, Any]]]] = []
    for body in bodies.values():
        changes += [(kind, functools.partial(stated, rules=rules)) for kind, rules in body.rules.items()]
        changes += [
            (kind, functools.partial(_refusing, names=names, unrefused=body.unrefused))
            for kind, names in body.refused_in.items()
        ]
    kinds = [b.struct for b in bodies.values()] + [kind for kind, _ in changes]
    tops, found = _schemas(tuple(kinds))
    # msgspec names a component by its struct (by its module too when two share a name): each body
    # takes the name its route gives it.
    names = dict(zip((_name(top) for top in tops), bodies, strict=False))
    schemas: dict[str, Any] = {names.get(k, k): _referring(v, names) for k, v in found.items()}
    _within_64_bits(schemas)
    for name, body in bodies.items():
        schemas[name]["title"] = name
        properties = schemas[name]["properties"]
        for length in body.lengths:
            _bound(properties[length], limit)
        if models and "model" in properties:
            properties["model"] |= {"examples": models}
        for key, value in body.no_op.items():
            properties[key] = nullable({"const": value, "description": f"only {value!r} is supported"})
        properties |= dict.fromkeys(body.refused, body.unrefused)
    for top, (_, change) in zip(tops[len(bodies) :], changes, strict=True):
        name = names.get(_name(top), _name(top))
        schemas[name] = change(schemas[name])
    return schemas


def _refusing(schema: dict[str, Any], names: Iterable[str], unrefused: dict[str, Any]) -> dict[str, Any]:
    return schema | {"properties": schema["properties"] | dict.fromkeys(names, unrefused)}


@functools.cache
def _schemas(kinds: tuple[type, ...]) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """msgspec's schemas of `kinds`, made once per process: made on each request they were 4 of
    the document's 4.5 ms; read only, `components` builds its own copy."""
    return msgspec.json.schema_components(kinds, ref_template=REF)


def _name(top: dict[str, Any]) -> str:
    return str(top["$ref"]).rsplit("/", 1)[-1]


def _referring(value: Any, names: dict[str, str]) -> Any:
    """`value` with its references to the components in `names` renamed."""
    if isinstance(value, dict):
        if "$ref" in value:
            name = _name(value)
            return {**value, "$ref": REF.format(name=names.get(name, name))}
        return {k: _referring(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_referring(v, names) for v in value]
    return value


def _within_64_bits(value: Any) -> None:
    """Every integer `value` holds bounded as `json_body` reads one (past 64 bits it is a float)."""
    if isinstance(value, dict):
        if value.get("type") == "integer":
            value.setdefault("minimum", INT_MIN)
            value.setdefault("maximum", INT_MAX)
        for item in value.values():
            _within_64_bits(item)
    elif isinstance(value, list):
        for item in value:
            _within_64_bits(item)


def _bound(schema: dict[str, Any], limit: int) -> None:
    """The integer in `schema` (alone, or one of its `anyOf`) at most `limit`."""
    for option in [schema, *schema.get("anyOf", ())]:
        if option.get("type") == "integer":
            option["maximum"] = limit
