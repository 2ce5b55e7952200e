"""Ollama's API: `/api/chat`, `/api/generate` (NDJSON streams, or one object with
`stream: false`), `/api/tags`, `/api/show`, `/api/ps`, `/api/version`.

Chats become the same routed chat as OpenAI's (`dialect_base`), with their tools, the
tool calls and results of their history and their `format` (`ollama_chat.py`). As Ollama
does, a request may hold fields it does not know (they are ignored) and streams by default;
an unknown option is logged and ignored, as Ollama's server does. What would change the
answer and exojet does not do (images, thinking, sampling options beyond
temperature/top_p/seed/stop) is refused by name. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api import ollama_chat as chat
from exojet.api import request_rules as rules
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError, bad_request, not_found
from exojet.api.json_body import decode_object
from exojet.bus.chat_ends import Ended
from exojet.bus.replies import StateReply
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import AnswerShape
from exojet.projections.instances import READY, instance_capabilities

if TYPE_CHECKING:
    from exojet.api.app import Api

NDJSON = "application/x-ndjson"
REFUSED = {
    "images": "images are not supported",
    "think": "thinking is not supported by this model",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "suffix": "suffix (fill in the middle) is not supported",
    "template": "a template of the request's own is not supported",
    "context": "context (the tokens of an earlier generate) is not supported; send the text instead",
}
# Options that shape memory or threads, not the answer: exojet's runners decide those.
NO_OP_OPTIONS = frozenset(
    "numa num_ctx num_batch num_gpu main_gpu low_vram f16_kv logits_all vocab_only use_mmap use_mlock "
    "embedding_only num_thread num_keep".split()
)
# Sampling options exojet's engines do not take: accepted only at the value that changes nothing.
NEUTRAL_OPTIONS: dict[str, float] = {
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "mirostat": 0,
    "tfs_z": 1.0,
    "typical_p": 1.0,
    "min_p": 0.0,
}
REFUSED_OPTIONS = frozenset({"top_k", "repeat_last_n", "penalize_newline", "mirostat_tau", "mirostat_eta"})


class Options(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_predict: int | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0)] | None = None
    stop: list[Annotated[str, msgspec.Meta(min_length=1)]] | Annotated[str, msgspec.Meta(min_length=1)] | None = None


class ChatBody(msgspec.Struct, frozen=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[chat.Message] = []
    tools: list[chat.InTool] | None = None
    format: chat.Format = None
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: Any = None  # how long Ollama keeps a model loaded: exojet's instances stay


class GenerateBody(msgspec.Struct, frozen=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    format: chat.Format = None
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class ShowBody(msgspec.Struct, frozen=True):
    model: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    name: Annotated[str, msgspec.Meta(min_length=1)] | None = None  # the older spelling


RULES: dict[type, tuple[rules.Rule, ...]] = {
    ChatBody: (
        rules.Rule(
            when={"tools": rules.NON_EMPTY},
            then={"format": rules.one_of(None, "")},
            param="format",
            message="format: tools and format cannot both shape one answer",
            code="unsupported_parameter",
        ),
    ),
    GenerateBody: (
        rules.Rule(
            when={"raw": rules.one_of(True)},
            then={"system": rules.one_of(None, "")},
            param="system",
            message="system: a raw prompt is used as given, with no system prompt",
        ),
    ),
    ShowBody: (
        rules.Rule(when={"model": rules.NULL}, then={"name": rules.GIVEN}, param="model", message="model is required"),
    ),
}


def error_response(err: ApiError) -> Response:
    return base.json_response({"error": err.message}, err.status, err.headers)


def model_id(name: str) -> str:
    """Ollama's names carry a tag, `:latest` when none is given: exojet's ids have none."""
    return name.removesuffix(":latest")


def _options(options: dict[str, Any] | None) -> Options:
    chosen = {}
    for name, value in (options or {}).items():
        if name in Options.__struct_fields__:
            chosen[name] = value
        elif name in REFUSED_OPTIONS or (name in NEUTRAL_OPTIONS and not _neutral(value, NEUTRAL_OPTIONS[name])):
            raise bad_request(f"option {name!r} is not supported by exojet's engines", param=f"options.{name}")
        elif name not in NO_OP_OPTIONS and name not in NEUTRAL_OPTIONS:
            logger.bind(component="api").warning(f"invalid option provided: {name}")
    return base.convert(chosen, Options)


def _neutral(value: Any, neutral: float) -> bool:
    # A bool is an int to Python, not a number to JSON.
    return isinstance(value, int | float) and not isinstance(value, bool) and value == neutral


def _request(
    model: str, messages: list[ChatMessage], stream: bool, options: Options, limit: int, shape: AnswerShape
) -> ChatRequest:
    # Ollama's -1 (until the model stops) and -2 (fill the context): the runner's default length.
    asked = options.num_predict if options.num_predict and options.num_predict > 0 else None
    if options.num_predict == 0:
        raise bad_request("option 'num_predict' must not be 0", param="options.num_predict")
    max_tokens = base.answer_length(asked, "num_predict", limit)
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    return ChatRequest(
        model=model_id(model),
        messages=tuple(messages),
        stream=stream,
        include_usage=True,
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=tuple(stop) if stop else None,
        ),
        shape=shape,
    )


def _refuse_messages(data: dict[str, Any]) -> None:
    """ApiError(400) naming the first message that carries images, before the struct would call
    them only a wrong value."""
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(m, dict) and rules.asks(m.get("images")):
            raise bad_request(f"messages[{i}].images: images are not supported", param=f"messages[{i}].images")


def parse_chat(raw: bytes, limit: int) -> ChatRequest:
    """An `/api/chat` body as the routed chat, or ApiError(400)."""
    data = rules.refuse(decode_object(raw), REFUSED)
    _refuse_messages(data)
    body = base.convert(data, ChatBody)
    rules.check(RULES[ChatBody], body)
    shape = chat.shape(body.tools, body.format)
    return _request(body.model, chat.chat_messages(body.messages), body.stream, _options(body.options), limit, shape)


def parse_generate(raw: bytes, limit: int) -> ChatRequest:
    """An `/api/generate` body as the routed chat, or ApiError(400)."""
    body = base.convert(rules.refuse(decode_object(raw), REFUSED), GenerateBody)
    rules.check(RULES[GenerateBody], body)
    system = [ChatMessage("system", body.system)] if body.system else []
    messages = [*system, ChatMessage("user", body.prompt)] if body.prompt else []
    shape = chat.shape(None, body.format)
    req = _request(body.model, messages, body.stream, _options(body.options), limit, shape)
    return msgspec.structs.replace(req, raw=True) if body.raw else req


# What a route's answer says: its text and its tool calls (Ollama's shape), as the route has them.
Says = Callable[[str, list[dict[str, Any]]], dict[str, Any]]


def _message(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat's answer: `message`, with its tool calls when it made any."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    return {"message": message | {"tool_calls": calls} if calls else message}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details() -> dict[str, Any]:
    # What Ollama reads from its manifests; the API holds no model files to read them from.
    return dict.fromkeys(("parent_model", "format", "family", "parameter_size", "quantization_level"), "")


def _capabilities(state: StateReply, model: str) -> list[str]:
    """Ollama's capabilities of a served model (clients read `tools` before sending any): a
    completion, and tools when a Ready instance of it can call them (what its runners state)."""
    ready = [i for i in state.instances.values() if i.model_id == model and i.status == READY]
    tools = any("tools" in instance_capabilities(state.runners, i) for i in ready)
    return ["completion", "tools"] if tools else ["completion"]


def _model(name: str) -> dict[str, Any]:
    # exojet's models have no Ollama manifest: a digest of the id keeps each one's stable.
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {"name": name, "model": name, "modified_at": _now(), "size": 0, "digest": digest, "details": _details()}


class Ollama:
    """The routes' handlers."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await request.body(), self.api.config.max_tokens_limit)
        return await self._answer(request, req, _message)

    async def generate(self, request: Request) -> Response:
        req = parse_generate(await request.body(), self.api.config.max_tokens_limit)
        # A generate has no tools: it calls none.
        return await self._answer(request, req, lambda text, calls: {"response": text})

    async def _answer(self, request: Request, req: ChatRequest, says: Says) -> Response:
        """`req` answered the Ollama way; `says` puts text and tool calls where the route's answer
        has them (`message` for a chat, `response` for a generate)."""
        started = time.monotonic_ns()
        head = {"model": req.model}
        if not req.messages:
            # Ollama's way to load a model: no prompt, an answer saying it is loaded.
            await base.check_model(self.api.gw, req.model)
            return base.json_response(
                {**head, "created_at": _now(), **says("", []), "done": True, "done_reason": "load"}
            )

        def final(outcome: Ended, text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
            prompt, completion = base.tokens(outcome)
            rate = outcome.result.tokens_per_second
            evaluating = int(completion / rate * 1e9) if rate > 0 else 0
            engine = int(outcome.result.engine_seconds * 1e9)
            return {
                **head,
                "created_at": _now(),
                **says(text, calls),
                "done": True,
                "done_reason": chat.done_reason(base.finish_reason(outcome)),
                "total_duration": time.monotonic_ns() - started,
                "load_duration": 0,
                "prompt_eval_count": prompt,
                "prompt_eval_duration": max(engine - evaluating, 0),
                "eval_count": completion,
                "eval_duration": evaluating,
            }

        def line(piece: chat.Said) -> dict[str, Any]:
            if isinstance(piece, str):
                return {**head, "created_at": _now(), **says(piece, []), "done": False}
            if isinstance(piece, dict):
                return {**head, "created_at": _now(), **says("", [piece]), "done": False}
            if isinstance(piece, ApiError):
                return {"error": piece.message}
            # The calls were each sent whole as they came.
            return final(piece, "", [])

        async def lines(chat_id: str, pieces: AsyncIterator[base.CallPiece]) -> AsyncIterator[bytes]:
            async for piece in chat.whole_calls(pieces):
                yield msgspec.json.encode(line(piece)) + b"\n"

        def whole(chat_id: str, text: str, outcome: Ended) -> dict[str, Any]:
            return final(outcome, text, chat.calls_json(outcome.result.tool_calls))

        return await base.respond(request, self.api.gw, req, lines, whole, NDJSON, call_events=lines)

    async def tags(self, request: Request) -> Response:
        return base.json_response({"models": [_model(m) for m in await self._served()]})

    async def ps(self, request: Request) -> Response:
        # Loaded models: exojet's Ready instances, which stay until deleted.
        loaded = [{**_model(m), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0} for m in await self._served()]
        return base.json_response({"models": loaded})

    async def show(self, request: Request) -> Response:
        body = base.convert(decode_object(await request.body()), ShowBody)
        rules.check(RULES[ShowBody], body)
        name = body.model or body.name or ""
        state = await self.api.gw.cluster_runners()
        if model_id(name) not in base.served_models(state):
            raise not_found(f"model '{name}' not found")
        return base.json_response(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": _details(),
                "model_info": {},
                "capabilities": _capabilities(state, model_id(name)),
                "modified_at": _now(),
            }
        )

    async def version(self, request: Request) -> Response:
        return base.json_response({"version": version("exojet")})

    async def _served(self) -> list[str]:
        return base.served_models(await self.api.gw.cluster())


def routes(api: Api) -> list[Route]:
    ollama = Ollama(api)
    return [
        Route("/api/chat", ollama.chat, methods=["POST"]),
        Route("/api/generate", ollama.generate, methods=["POST"]),
        Route("/api/tags", ollama.tags, methods=["GET"]),
        Route("/api/ps", ollama.ps, methods=["GET"]),
        Route("/api/show", ollama.show, methods=["POST"]),
        Route("/api/version", ollama.version, methods=["GET"]),
    ]
