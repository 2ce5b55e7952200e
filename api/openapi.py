"""The OpenAPI 3.1 document served at `/openapi.json`.

Its request bodies are generated from the structs the parsers decode into (`request_schemas.py`):
the chat completion's from `chat_request.ChatBody`, with the parameters exojet does not support
listed with only the values that ask for nothing allowed (null, false, empty: some clients send every
parameter), so a schema-driven client sees what a request may hold. The other dialects' routes come
from `dialect_schemas.py`.
"""

from __future__ import annotations

from typing import Any

from exojet import __version__
from exojet.api import dialect_schemas, request_schemas
from exojet.api.chat_request import ANSWER_LENGTHS, NO_OP_DEFAULTS, RULES, UNSUPPORTED, ChatBody
from exojet.api.dialect_schemas import json_content as _json
from exojet.api.request_schemas import Body
from exojet.api.request_schemas import nullable as _nullable
from exojet.api.request_schemas import ref as _ref

CHAT = Body(
    ChatBody,
    lengths=ANSWER_LENGTHS,
    no_op=NO_OP_DEFAULTS,
    refused=UNSUPPORTED,
    rules=RULES,
)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


def _completion(
    kind: str,
    part: str,
    part_extra: dict[str, Any],
    finish: dict[str, Any],
    usage: dict[str, Any],
    usage_required: bool,
) -> dict[str, Any]:
    """A `chat.completion` (its choices hold a `message`) or a chunk of one (a `delta`)."""
    text = {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}
    choice = {
        "type": "object",
        "required": ["index", part, "finish_reason"],
        "properties": {"index": {"type": "integer"}, part: {**text, **part_extra}, "finish_reason": finish},
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"] + (["usage"] if usage_required else []),
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": usage,
        },
    }


def _components(max_tokens_limit: int, models: list[str]) -> dict[str, Any]:
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    finish = {"type": "string", "enum": ["stop", "length", "cancelled"]}
    bodies = {"ChatCompletionRequest": CHAT} | dialect_schemas.BODIES
    generated = request_schemas.components(bodies, max_tokens_limit, models)
    return (
        generated
        | dialect_schemas.components(max_tokens_limit, models, generated)
        | {
            "ChatCompletion": _completion(
                "chat.completion", "message", {"required": ["role", "content"]}, finish, usage, usage_required=True
            ),
            "ChatEvent": {
                "description": "one server-sent event: `data` is a chunk, an error, or [DONE] (the last)",
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {
                        "anyOf": [
                            {"const": "[DONE]"},
                            {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"anyOf": [_ref("ChatCompletionChunk"), _ref("Error")]},
                            },
                        ]
                    }
                },
            },
            "ChatCompletionChunk": _completion(
                "chat.completion.chunk", "delta", {}, _nullable(finish), _nullable(usage), usage_required=False
            ),
            "Model": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                },
            },
            "ModelList": {
                "type": "object",
                "required": ["object", "data"],
                "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
            },
            "Cancellation": {
                "type": "object",
                "required": ["id", "object", "tasks"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "chat.completion.cancellation"},
                    "tasks": {"type": "array", "items": {"type": "string"}},
                },
            },
            "Health": {
                "type": "object",
                "required": ["status", "nats"],
                "properties": {"status": {"type": "string"}, "nats": {"type": "boolean"}},
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "param", "code"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            },
        }
    )


def schema(max_tokens_limit: int, secured: bool, models: list[str]) -> dict[str, Any]:
    """The document; `secured` adds the bearer scheme every route but /health requires;
    `models` (served now) are the examples of a request's `model`."""
    auth = {"401": _error("missing or wrong API key")} if secured else {}
    unavailable = {"503": _error("no supervisor answers, or the model is not Ready yet")}
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    chat_id = {"name": "chat_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": {"description": "connected to NATS", "content": _json("Health")},
                    "503": {"description": "not connected to NATS", "content": _json("Health")},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "responses": {"200": {"description": "this document", "content": {"application/json": {}}}, **auth},
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "responses": {
                    "200": {"description": "models with a Ready instance", "content": _json("ModelList")},
                    **auth,
                    **unavailable,
                },
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "operationId": "retrieveModel",
                "parameters": [model_id],
                "responses": {
                    "200": {"description": "a model with a Ready instance", "content": _json("Model")},
                    "404": _error("no Ready instance of that model"),
                    **auth,
                    **unavailable,
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "requestBody": {"required": True, "content": _json("ChatCompletionRequest")},
                "responses": {
                    "200": {
                        "description": "the completion, or with `stream` its chunks as server-sent events",
                        "content": {**_json("ChatCompletion"), "text/event-stream": {"schema": _ref("ChatEvent")}},
                    },
                    "400": _error("an invalid or unsupported parameter (named in `param`)"),
                    **auth,
                    "404": _error("the model has no instance"),
                    "409": _error("the chat was cancelled"),
                    "429": _error("every Ready instance of the model has a full queue; see Retry-After"),
                    "500": _error("the runner failed (its named error in `code`)"),
                    **unavailable,
                    "504": _error("the chat timed out"),
                },
            }
        },
        "/v1/cancel/{chat_id}": {
            "post": {
                "operationId": "cancelChatCompletion",
                "parameters": [chat_id],
                "responses": {
                    "200": {"description": "cancels sent to the chat's runners", "content": _json("Cancellation")},
                    "404": _error("no such chat in flight"),
                    **auth,
                    **unavailable,
                },
            }
        },
    }
    paths |= dialect_schemas.paths(secured)
    schemas = _components(max_tokens_limit, models)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "exojet API (OpenAI, Anthropic and Ollama dialects)", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
