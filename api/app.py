"""The Starlette application: the API's dialects and models over the gateway.

Routes: each dialect's (`dialect_*.py`: OpenAI chat completions, completions and
Responses, Anthropic Messages, Ollama), `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/cancel/{id}`, `GET /health`, `GET /openapi.json`, the live page. Every failure
is an `ApiError`, answered in the shape of the dialect its path belongs to (OpenAI's
`{"error": {...}}` unless the path is Anthropic's or Ollama's).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from nats.aio.client import Client as NATS
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exojet.api import (
    dialect_anthropic,
    dialect_completions,
    dialect_ollama,
    dialect_openai,
    dialect_responses,
    openapi,
)
from exojet.api.config import ApiConfig
from exojet.api.dialect_base import json_response, served_models
from exojet.api.errors import ApiError, not_found, unavailable
from exojet.api.gateway import Gateway
from exojet.api.page import page_routes
from exojet.api.page_login import LOGIN_PATH, has_page_cookie, login_form, login_route
from exojet.bus.nats import client
from exojet.bus.nats.chat_session import ChatSession

PUBLIC_PATHS = ("/health", LOGIN_PATH)
# How long /openapi.json waits for the served models it gives as examples.
SCHEMA_EXAMPLES_WAIT_S = 2.0


def _openai_error(err: ApiError) -> Response:
    return Response(err.encode(), err.status, err.headers, media_type="application/json")


# Each dialect answers errors in its own shape, told apart by the path (first match wins).
ERROR_SHAPES: tuple[tuple[str, Callable[[ApiError], Response]], ...] = (
    ("/v1/messages", dialect_anthropic.error_response),
    ("/api/", dialect_ollama.error_response),
)


def _error(err: ApiError, path: str) -> Response:
    for prefix, shape in ERROR_SHAPES:
        if path.startswith(prefix):
            return shape(err)
    return _openai_error(err)


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
                problem = self._key_problem(headers.get(b"authorization", b""), headers.get(b"x-api-key"))
                if problem is not None and scope["path"] == "/":
                    # A browser opening the page: ask for the key (then the cookie carries it).
                    await login_form()(scope, receive, send)
                    return
            if problem is not None:
                await _error(problem, scope["path"])(scope, receive, send)
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

    def _key_problem(self, authorization: bytes, x_api_key: bytes | None) -> ApiError | None:
        """None if the key came as a bearer token, or in `x-api-key` (Anthropic's clients send it there)."""
        assert self.key is not None
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return None
        if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), self.key):
            return None
        sent = authorization or x_api_key
        what = "Incorrect API key provided" if sent else "Missing API key (send Authorization: Bearer KEY)"
        return ApiError(401, what, code="invalid_api_key")


def _model_object(model_id: str) -> dict[str, Any]:
    owner = model_id.split("/", 1)[0] if "/" in model_id else "exojet"
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


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
        session = ChatSession(
            self.nc, liveness_timeout=self.config.liveness_timeout, route_timeout=self.config.route_timeout
        )
        gateway = Gateway(session)
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
        return json_response({"status": "ok" if ok else "unavailable", "nats": ok}, 200 if ok else 503)

    async def schema(self, request: Request) -> Response:
        try:
            # Bounded: a cluster query waits up to 30 s for a supervisor, the document needs none.
            models = served_models(await asyncio.wait_for(self.gw.cluster(), SCHEMA_EXAMPLES_WAIT_S))
        except (ApiError, TimeoutError):
            models = []  # the document does not depend on a supervisor; only its examples do
        return json_response(openapi.schema(self.config.max_tokens_limit, self.config.api_key is not None, models))

    async def models(self, request: Request) -> Response:
        state = await self.gw.cluster()
        return json_response({"object": "list", "data": [_model_object(m) for m in served_models(state)]})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in served_models(await self.gw.cluster()):
            raise not_found(f"The model {model_id!r} does not exist or has no Ready instance")
        return json_response(_model_object(model_id))

    async def cancel(self, request: Request) -> Response:
        chat_id = request.path_params["chat_id"]
        tasks = await self.gw.cancel(chat_id, "cancelled through POST /v1/cancel")
        if tasks is None:
            raise not_found(f"no chat {chat_id!r} is in flight", code="chat_not_found", param=None)
        return json_response({"id": chat_id, "object": "chat.completion.cancellation", "tasks": sorted(tasks)})


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc, request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    error.headers.update(exc.headers or {})  # a 405's Allow
    return _error(error, request.url.path)


async def _on_crash(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {exc!r}", type="server_error", code="internal_error")
    return _error(error, request.url.path)


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
                # x-api-key and anthropic-version: what Anthropic's clients send.
                allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
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
            *dialect_openai.routes(api),
            *dialect_anthropic.routes(api),
            *dialect_ollama.routes(api),
            *dialect_responses.routes(api),
            *dialect_completions.routes(api),
            Route("/v1/cancel/{chat_id}", api.cancel, methods=["POST"]),
            *page,
            *([Route(LOGIN_PATH, login_route(config.api_key.encode()), methods=["POST"])] if config.api_key else []),
        ],
        middleware=middleware,
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_crash},
        lifespan=lifespan,
    )
