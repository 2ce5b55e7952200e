"""The Starlette application: OpenAI's chat completions and models over the gateway.

Routes: `POST /v1/chat/completions` (streamed as server-sent events or not),
`GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/cancel/{id}`, `GET /health`,
`GET /openapi.json`. Every failure is OpenAI's `{"error": {...}}` with its status;
a failure after a stream began is one `data: {"error": ...}` event, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exojet.api import openapi
from exojet.api.chat_request import DEFAULT_MAX_TOKENS_LIMIT, ChatRequest, parse_chat
from exojet.api.errors import ApiError, not_found, unavailable
from exojet.api.gateway import ChatStream, Chunk, Ended, Gateway, Lost
from exojet.api.page import page_routes
from exojet.api.page_login import LOGIN_PATH, has_page_cookie, login_form, login_route
from exojet.bus import client
from exojet.projections.instances import ENDED_STATUSES, READY

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/health", LOGIN_PATH)


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    api_key: str | None = None
    # Host header names accepted (None: any). A loopback API accepts only
    # loopback names, so a web page on a rebound domain cannot reach it.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    cors_origins: tuple[str, ...] = ()
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    liveness_timeout: float = 5.0
    route_timeout: float = 10.0


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def _error(err: ApiError) -> Response:
    return Response(err.encode(), err.status, err.headers, media_type="application/json")


class _Guard:
    """Host header and API key checks, before anything else runs (pure ASGI)."""

    def __init__(self, app: ASGIApp, config: ApiConfig) -> None:
        self.app = app
        self.allowed = config.allowed_hosts
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = self._host_problem(headers.get(b"host", b"").decode("latin-1"))
            if (
                problem is None
                and self.key is not None
                and scope["path"] not in PUBLIC_PATHS
                and not has_page_cookie(headers.get(b"cookie", b""), self.key)
            ):
                problem = self._key_problem(headers.get(b"authorization", b""))
                if problem is not None and scope["path"] == "/":
                    # A browser opening the page: ask for the key (then the cookie carries it).
                    await login_form()(scope, receive, send)
                    return
            if problem is not None:
                await _error(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _host_problem(self, host: str) -> ApiError | None:
        if self.allowed is None:
            return None
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name in self.allowed:
            return None
        return ApiError(
            400, f"Host {host!r} is not served here (allowed: {', '.join(self.allowed)})", code="invalid_host"
        )

    def _key_problem(self, authorization: bytes) -> ApiError | None:
        assert self.key is not None
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return None
        what = "Incorrect API key provided" if authorization else "Missing API key (send Authorization: Bearer KEY)"
        return ApiError(401, what, code="invalid_api_key")


def _model_status(state: dict[str, Any], model: str) -> str | None:
    """Ready if an instance of `model` is; else the status of one on its way; None if it has none."""
    statuses = [
        i["status"] for i in state["instances"].values() if i["model_id"] == model and i["status"] not in ENDED_STATUSES
    ]
    if READY in statuses:
        return READY
    return statuses[0] if statuses else None


def served_models(state: dict[str, Any]) -> list[str]:
    """Models with at least one Ready instance."""
    return sorted({i["model_id"] for i in state["instances"].values() if i["status"] == READY})


def _model_object(model_id: str) -> dict[str, Any]:
    owner = model_id.split("/", 1)[0] if "/" in model_id else "exojet"
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def _outcome_error(outcome: Ended | Lost, chat_id: str) -> ApiError | None:
    """None for a completed chat, else the error the client gets."""
    if isinstance(outcome, Lost):
        return unavailable(f"{chat_id}: {outcome.reason}", "runner_lost", retry_after=1)
    if outcome.status == "Complete":
        return None
    detail = f"{chat_id} {outcome.status}: {outcome.error_type}: {outcome.error_message}"
    if outcome.status == "Cancelled":
        return ApiError(409, detail, type="cancelled", code="cancelled")
    if outcome.status == "TimedOut":
        return ApiError(504, detail, type="server_error", code="timed_out")
    return ApiError(500, detail, type="server_error", code=outcome.error_type)


async def _answer(stream: ChatStream) -> AsyncIterator[str | Ended | Lost]:
    """The chat's text deltas as they come, then its outcome."""
    said = ""
    while True:
        item = await stream.items.get()
        if isinstance(item, Chunk):
            said += item.text
            yield item.text
            continue
        if isinstance(item, Ended) and item.status == "Complete":
            # Chunks and the status come on two streams: the result's text is the
            # whole answer, so send whatever chunks have not been read yet.
            final = item.result.get("text")
            if isinstance(final, str) and final.startswith(said) and len(final) > len(said):
                yield final[len(said) :]
        yield item
        return


def _usage(outcome: Ended) -> dict[str, int]:
    prompt = int(outcome.result.get("prompt_tokens", 0))
    completion = int(outcome.result.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class Api:
    """The routes' handlers around one gateway."""

    def __init__(self, config: ApiConfig, nc: NATS) -> None:
        self.config = config
        self.nc = nc
        self.gateway: Gateway | None = None

    @property
    def gw(self) -> Gateway:
        if self.gateway is None:
            raise unavailable("the API is not connected to NATS yet", "starting")
        return self.gateway

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # The connection waited for a server at start (api/main.py) and never gives up on it
        # (/health says 503 while it is away).
        gateway = Gateway(
            self.nc, liveness_timeout=self.config.liveness_timeout, route_timeout=self.config.route_timeout
        )
        await gateway.start()
        self.gateway = gateway
        try:
            yield
        finally:
            self.gateway = None
            await gateway.stop()
            await client.close(self.nc)

    async def health(self, request: Request) -> Response:
        ok = self.gateway is not None and self.gateway.connected
        return _json({"status": "ok" if ok else "unavailable", "nats": ok}, 200 if ok else 503)

    async def schema(self, request: Request) -> Response:
        try:
            models = served_models(await self.gw.cluster())
        except ApiError:
            models = []  # the document does not depend on a supervisor; only its examples do
        return _json(openapi.schema(self.config.max_tokens_limit, self.config.api_key is not None, models))

    async def models(self, request: Request) -> Response:
        state = await self.gw.cluster()
        return _json({"object": "list", "data": [_model_object(m) for m in served_models(state)]})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in served_models(await self.gw.cluster()):
            raise not_found(f"The model {model_id!r} does not exist or has no Ready instance")
        return _json(_model_object(model_id))

    async def cancel(self, request: Request) -> Response:
        chat_id = request.path_params["chat_id"]
        tasks = await self.gw.cancel(chat_id, "cancelled through POST /v1/cancel")
        if tasks is None:
            raise not_found(f"no chat {chat_id!r} is in flight", code="chat_not_found", param=None)
        return _json({"id": chat_id, "object": "chat.completion.cancellation", "tasks": sorted(tasks)})

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await request.body(), self.config.max_tokens_limit)
        gateway = self.gw
        await self._check_model(gateway, req.model)
        stream = await gateway.open_chat()
        try:
            await gateway.submit(stream, req)
        except BaseException:
            gateway.close(stream, "the request failed before its chat was routed")
            raise
        if req.stream:
            return StreamingResponse(
                self._events(gateway, stream, req),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(request, gateway, stream, req)

    async def _check_model(self, gateway: Gateway, model: str) -> None:
        recent = gateway.recent_view()
        if recent is not None and _model_status(recent, model) == READY:
            return
        status = _model_status(await gateway.cluster(), model)
        if status != READY:
            status = _model_status(await gateway.cluster(fresh=True), model)
        if status is None:
            served = ", ".join(served_models(await gateway.cluster())) or "none"
            raise not_found(
                f"The model {model!r} does not exist or has no instance (served: {served}); "
                f"place it with `exojet place {model}`"
            )
        if status != READY:
            raise unavailable(f"the model {model!r} is {status}, not Ready yet", "model_not_ready")

    async def _whole(self, request: Request, gateway: Gateway, stream: ChatStream, req: ChatRequest) -> Response:
        async def collect() -> tuple[str, Ended | Lost]:
            parts = []
            async for item in _answer(stream):
                if isinstance(item, str):
                    parts.append(item)
                else:
                    return "".join(parts), item
            raise AssertionError("an answer always ends with its outcome")

        answer = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                gateway.close(stream, "client disconnected")
        if not answer.done() or answer.cancelled():
            return Response(status_code=499)
        gateway.close(stream, "answered")
        text, outcome = answer.result()
        if (err := _outcome_error(outcome, stream.chat_id)) is not None:
            raise err
        assert isinstance(outcome, Ended)
        return _json(
            {
                "id": stream.chat_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": outcome.result.get("finish_reason", "stop"),
                        "logprobs": None,
                    }
                ],
                "usage": _usage(outcome),
            }
        )

    async def _events(self, gateway: Gateway, stream: ChatStream, req: ChatRequest) -> AsyncIterator[bytes]:
        base = {
            "id": stream.chat_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
        }
        usage: dict[str, Any] = {"usage": None} if req.include_usage else {}

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return _sse(
                {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
                | usage
            )

        try:
            yield choice({"role": "assistant", "content": ""})
            async for item in _answer(stream):
                if isinstance(item, str):
                    yield choice({"content": item})
                    continue
                err = _outcome_error(item, stream.chat_id)
                if err is not None:
                    yield _sse(err.body())
                else:
                    assert isinstance(item, Ended)
                    yield choice({}, item.result.get("finish_reason", "stop"))
                    if req.include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(item)})
            yield b"data: [DONE]\n\n"
        finally:
            # Runs when the stream ends and when the client goes away mid-way
            # (the response is cancelled): an unfinished chat is cancelled.
            gateway.close(stream, "client disconnected")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    error.headers.update(exc.headers or {})  # a 405's Allow
    return _error(error)


async def _on_crash(request: Request, exc: Exception) -> Response:
    return _error(ApiError(500, f"internal error: {exc!r}", type="server_error", code="internal_error"))


def create_app(config: ApiConfig, nc: NATS) -> Starlette:
    """The ASGI application on `nc` (its lifespan closes it)."""
    api = Api(config, nc)
    middleware = []
    if config.cors_origins:
        # Outside the guard: a browser's preflight carries no API key.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    middleware.append(Middleware(_Guard, config=config))
    page, lifespan = page_routes(config.nats_url, api.lifespan)
    return Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/openapi.json", api.schema, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/cancel/{chat_id}", api.cancel, methods=["POST"]),
            *page,
            *([Route(LOGIN_PATH, login_route(config.api_key.encode()), methods=["POST"])] if config.api_key else []),
        ],
        middleware=middleware,
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_crash},
        lifespan=lifespan,
    )
