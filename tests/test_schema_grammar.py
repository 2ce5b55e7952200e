"""runner/answer_plan.py's grammar of a JSON schema: objects that name their properties are closed,
as llama.cpp's and Ollama's schema grammars read them (pure)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema_rs
import pytest

from exojet.runner.answer_plan import closed_objects, schema_grammar
from exojet.runner.engine_backend import RequestError

CITY: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"],
}


def test_an_object_naming_its_properties_takes_no_others() -> None:
    closed = jsonschema_rs.validator_for(closed_objects(CITY))
    assert closed.is_valid({"city": "Paris", "unit": "C"})
    assert not closed.is_valid({"city": "Paris", "unit": "C", "type": "string"})
    # JSON Schema itself allows them: the schema as given is left as it was.
    assert jsonschema_rs.validator_for(CITY).is_valid({"city": "Paris", "type": "string"})
    assert "additionalProperties" not in CITY


def test_objects_are_closed_wherever_a_schema_holds_schemas() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            # A property named as a keyword is a property, not a keyword.
            "properties": CITY,
            "list": {"type": "array", "items": CITY},
            "pair": {"type": "array", "prefixItems": [CITY, {"$ref": "#/$defs/place"}]},
            "either": {"anyOf": [CITY, {"type": "string"}]},
            "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
            "free": {"type": "object"},
            # Parts of an intersection name each other's keys: left open.
            "both": {"allOf": [CITY, {"properties": {"zip": {"type": "string"}}}]},
        },
        "$defs": {"place": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    before = copy.deepcopy(schema)
    out = closed_objects(schema)
    assert schema == before
    props = out["properties"]
    closed = [
        out,
        props["properties"],
        props["list"]["items"],
        props["pair"]["prefixItems"][0],
        props["either"]["anyOf"][0],
        out["$defs"]["place"],
    ]
    assert all(s["additionalProperties"] is False for s in closed)
    assert "additionalProperties" not in props["properties"]["properties"]
    assert props["open"]["additionalProperties"] is True
    assert props["free"] == {"type": "object"}
    assert props["both"] == schema["properties"]["both"]
    valid = jsonschema_rs.validator_for(out)
    assert valid.is_valid(
        {"pair": [{"city": "Paris"}, {"name": "Lyon"}], "free": {"any": 1}, "both": {"city": "Paris", "zip": "75"}}
    )
    assert not valid.is_valid({"pair": [{"city": "Paris"}, {"name": "Lyon", "x": 1}]})


def test_the_closed_schema_compiles_and_a_broken_one_is_refused() -> None:
    assert '"additionalProperties": false' in schema_grammar(CITY)
    with pytest.raises(RequestError, match="does not compile"):
        schema_grammar({"type": "nonsense"})
