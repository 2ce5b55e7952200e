"""The OpenAPI paths and schemas of the dialects beside OpenAI's chat (`openapi.py` merges them).

Each request schema says exactly what its dialect's parser (`dialect_*.py`) accepts:
fields exojet refuses accept only a value that asks for nothing (null, false, empty);
Anthropic's, Responses' and completions' bodies allow no other fields, Ollama's any
(its server ignores them). A schema-driven client, and schemathesis, see what passes.
"""

from __future__ import annotations

from typing import Any

from exojet.api import anthropic_request, dialect_completions, dialect_ollama, ollama_chat, responses_request
from exojet.api.json_body import INT_MAX, INT_MIN
from exojet.api.request_schemas import ABSENT, Body, nullable, ref

STRING = {"type": "string"}
OBJECT = {"type": "object"}
TEXT = {"type": "string", "minLength": 1}
NEVER = {"not": {}, "description": "refused by name"}
# A streamed answer: server-sent events (named by Anthropic and Responses), or Ollama's JSON lines.
STREAM_SCHEMAS = {"text/event-stream": "DialectEvent", "application/x-ndjson": "OllamaLine"}


# Generated from the structs their parsers decode into (`request_schemas`).
BODIES = {
    # Ollama's `options` are read by hand (`_with_options` describes them).
    "OllamaChatRequest": Body(
        dialect_ollama.ChatBody,
        refused=dialect_ollama.REFUSED,
        rules=dialect_ollama.RULES,
        refused_in={ollama_chat.Message: ollama_chat.MESSAGE_REFUSED},
    ),
    "OllamaGenerateRequest": Body(
        dialect_ollama.GenerateBody, refused=dialect_ollama.REFUSED, rules=dialect_ollama.RULES
    ),
    "OllamaShowRequest": Body(dialect_ollama.ShowBody, rules=dialect_ollama.RULES),
    "AnthropicMessagesRequest": Body(
        anthropic_request.MessagesBody,
        lengths=("max_tokens",),
        refused=anthropic_request.REFUSED,
        rules=anthropic_request.RULES,
        refused_in={anthropic_request.ToolDef: anthropic_request.TOOL_REFUSED},
    ),
    "ResponsesRequest": Body(
        responses_request.ResponsesBody,
        lengths=("max_output_tokens",),
        refused=responses_request.REFUSED,
        rules=responses_request.RULES,
        refused_in={responses_request.FunctionTool: responses_request.TOOL_REFUSED},
    ),
    "CompletionRequest": Body(
        dialect_completions.CompletionsBody,
        lengths=("max_tokens",),
        no_op=dialect_completions.NO_OP_DEFAULTS,
        refused=dialect_completions.REFUSED,
        rules=dialect_completions.RULES,
    ),
}


def json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref(name)}}


def _strict(properties: dict[str, Any], required: list[str], refused: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": properties | dict.fromkeys(refused, ABSENT),
        "additionalProperties": False,
    }


def _model(models: list[str]) -> dict[str, Any]:
    return {**TEXT, "description": "a model with a Ready instance"} | ({"examples": models} if models else {})


def _count(messages: dict[str, Any]) -> dict[str, Any]:
    fields = anthropic_request.COUNT_FIELDS | set(anthropic_request.REFUSED)
    return messages | {
        "title": "AnthropicCountTokensRequest",
        "required": ["model", "messages"],
        "properties": {k: v for k, v in messages["properties"].items() if k in fields},
    }


def _with_options(body: dict[str, Any], limit: int) -> dict[str, Any]:
    """An Ollama body with its `options` as `dialect_ollama._options` reads them."""
    return body | {"properties": body["properties"] | {"options": _ollama_options(limit)}}


def _ollama_options(limit: int) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "num_predict": nullable({"type": "integer", "minimum": INT_MIN, "maximum": limit, "not": {"const": 0}}),
        "temperature": nullable({"type": "number", "minimum": 0}),
        "top_p": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "seed": nullable({"type": "integer", "minimum": 0, "maximum": INT_MAX}),
        "stop": {"anyOf": [TEXT, {"type": "array", "items": TEXT}, {"type": "null"}]},
    }
    properties |= {name: {"const": value} for name, value in dialect_ollama.NEUTRAL_OPTIONS.items()}
    properties |= dict.fromkeys(dialect_ollama.REFUSED_OPTIONS, NEVER)
    return nullable({"type": "object", "properties": properties})


def components(limit: int, models: list[str], generated: dict[str, Any]) -> dict[str, Any]:
    """The schemas written here; `generated` holds those of `BODIES`."""
    answer = {"type": "object"}  # each dialect's own answer object (see the README)
    return {
        "AnthropicCountTokensRequest": _count(generated["AnthropicMessagesRequest"]),
        "AnthropicMessage": answer | {"required": ["id", "type", "role", "content", "stop_reason", "usage"]},
        "AnthropicTokenCount": answer
        | {"required": ["input_tokens"], "properties": {"input_tokens": {"type": "integer"}}},
        "AnthropicError": {
            "type": "object",
            "required": ["type", "error"],
            "properties": {
                "type": {"const": "error"},
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {"type": STRING, "message": STRING},
                },
            },
        },
        **{name: _with_options(generated[name], limit) for name in ("OllamaChatRequest", "OllamaGenerateRequest")},
        "OllamaAnswer": answer | {"required": ["model", "created_at", "done"]},
        "OllamaModels": answer | {"required": ["models"], "properties": {"models": {"type": "array", "items": OBJECT}}},
        "OllamaShow": answer | {"required": ["details", "capabilities"]},
        "OllamaVersion": answer | {"required": ["version"], "properties": {"version": STRING}},
        "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": STRING}},
        "OllamaLine": {"description": "one JSON object a line: an answer's piece, its last (done), or an error"},
        "DialectEvent": {
            "description": "one server-sent event: `data` is JSON (or [DONE], OpenAI's last), `event` its type",
            "type": "object",
            "required": ["data"],
            "properties": {"data": STRING, "event": STRING},
        },
        "Response": answer
        | {"required": ["id", "object", "status", "output"], "properties": {"object": {"const": "response"}}},
        "Completion": answer
        | {"required": ["id", "object", "choices", "usage"], "properties": {"object": {"const": "text_completion"}}},
    }


def _post(operation: str, request: str, answer: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation,
            "requestBody": {"required": True, "content": json_content(request)},
            "responses": {"200": answer, **errors},
        }
    }


def _errors(error: str, auth: bool, chat: bool) -> dict[str, Any]:
    def one(description: str) -> dict[str, Any]:
        return {"description": description, "content": json_content(error)}

    found = {"400": one("an invalid or unsupported parameter, named"), "404": one("the model has no instance")}
    served = {"409": one("cancelled"), "429": one("every instance's queue is full"), "500": one("the runner failed")}
    late = {"503": one("no supervisor answers, or the model is not Ready yet"), "504": one("the chat timed out")}
    return found | ({"401": one("missing or wrong API key")} if auth else {}) | (served | late if chat else late)


def paths(auth: bool) -> dict[str, Any]:
    anthropic, ollama, openai = (_errors(e, auth, chat=True) for e in ("AnthropicError", "OllamaError", "Error"))

    def answer(name: str, stream: str | None = None) -> dict[str, Any]:
        content = json_content(name) | ({stream: {"schema": ref(STREAM_SCHEMAS[stream])}} if stream else {})
        return {
            "description": "the answer" + (f", or with `stream` a {stream} stream" if stream else ""),
            "content": content,
        }

    def listing(operation: str, name: str) -> dict[str, Any]:
        errors = _errors("OllamaError", auth, chat=False)
        del errors["400"], errors["404"], errors["504"]
        return {"get": {"operationId": operation, "responses": {"200": answer(name), **errors}}}

    show_errors = _errors("OllamaError", auth, chat=False)
    del show_errors["504"]
    return {
        "/v1/messages": _post(
            "anthropicMessages", "AnthropicMessagesRequest", answer("AnthropicMessage", "text/event-stream"), anthropic
        ),
        "/v1/messages/count_tokens": _post(
            "anthropicCountTokens", "AnthropicCountTokensRequest", answer("AnthropicTokenCount"), anthropic
        ),
        "/api/chat": _post("ollamaChat", "OllamaChatRequest", answer("OllamaAnswer", dialect_ollama.NDJSON), ollama),
        "/api/generate": _post(
            "ollamaGenerate", "OllamaGenerateRequest", answer("OllamaAnswer", dialect_ollama.NDJSON), ollama
        ),
        "/api/show": _post("ollamaShow", "OllamaShowRequest", answer("OllamaShow"), show_errors),
        "/api/tags": listing("ollamaTags", "OllamaModels"),
        "/api/ps": listing("ollamaPs", "OllamaModels"),
        "/api/version": listing("ollamaVersion", "OllamaVersion"),
        "/v1/responses": _post("createResponse", "ResponsesRequest", answer("Response", "text/event-stream"), openai),
        "/v1/completions": _post(
            "createCompletion", "CompletionRequest", answer("Completion", "text/event-stream"), openai
        ),
    }
