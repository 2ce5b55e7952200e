"""A request's body as JSON, read one way by every route.

JSON has one number type, so a number is read as JSON Schema reads it: 3.0 is an integer (to a
validator and to the parsers; an int is a float too where one is expected), and an integer too
big for 64 bits is a number like 1e30. Such an integer (a schema's bound, a tool's parameters)
could not go on to the runner's engine, whose pipe holds 64-bit integers at most: it failed the
runner (schemathesis sent one in a tool's `parameters`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.api.errors import bad_request

# What msgpack (the engine's pipe) holds.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_decoder = msgspec.json.Decoder()


def decode_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, its numbers as JSON Schema reads them, or ApiError(400)."""
    try:
        data = _decoder.decode(raw)
    except msgspec.DecodeError as err:
        raise bad_request(f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    body: dict[str, Any] = _numbers(data)
    return body


def _numbers(value: Any) -> Any:
    """`value` with every whole float that fits 64 bits an int, and every int that does not a float."""
    if isinstance(value, float) and value.is_integer() and INT_MIN <= value <= INT_MAX:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value
