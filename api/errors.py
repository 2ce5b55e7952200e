"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

The other dialects answer the same `ApiError` in their own shape (`app.ERROR_SHAPES`)."""

from __future__ import annotations

import re
from typing import Any

import msgspec

# Where msgspec says a value is wrong: "... - at `$.messages[0].role`".
_AT_PATH = re.compile(r" - at (?:`key` in )?`\$\.?(?P<path>[^`]*)`$")


class ApiError(Exception):
    """An answer other than success; `body()` is what the client reads."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, code: str = "model_not_found", param: str | None = "model") -> ApiError:
    return ApiError(404, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 5) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after)})


def invalid(err: msgspec.ValidationError) -> ApiError:
    """A 400 naming the field msgspec found wrong (`param`) and what is wrong with it."""
    text = str(err)
    match = _AT_PATH.search(text)
    path = match.group("path") if match else ""
    detail = text[: match.start()] if match else text
    return bad_request(f"{path or 'body'}: {detail}", param=path or None, code="invalid_value")
