"""`exojet api`: serve the OpenAI-compatible HTTP API (a stateless NATS client)."""

from __future__ import annotations

import argparse

from exojet.api.chat_request import DEFAULT_MAX_TOKENS_LIMIT
from exojet.api.config import DEFAULT_HOST, DEFAULT_PORT, ApiConfig, allowed_hosts
from exojet.bus.nats.chat_session import DEFAULT_LIVENESS_TIMEOUT_S
from exojet.cli.api_key import BadApiKeyFile, NoApiKey, add_key_arguments, api_key_from_args
from exojet.cli.options import Subparsers, add_nats, fail


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("api", help="serve the OpenAI-compatible HTTP API (a stateless NATS client)")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default %(default)s; beyond loopback only with an API key or --allow-no-key)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default %(default)s)")
    add_key_arguments(p)
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="also accept this Host header name (default: loopback names on a loopback bind, else the bound one)",
    )
    p.add_argument("--cors-origin", action="append", default=[], help="allow browsers from this origin (CORS)")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        help="largest max_tokens a request may ask (default %(default)s)",
    )
    p.add_argument(
        "--liveness-timeout",
        type=float,
        default=DEFAULT_LIVENESS_TIMEOUT_S,
        help="end a chat with an error once its runner has sent no heartbeat for this long (default %(default)g)",
    )
    add_nats(p)
    p.set_defaults(func=run)


def api_config(args: argparse.Namespace) -> ApiConfig:
    """The API's configuration from the parsed arguments (BadApiKeyFile, NoApiKey: see cli/api_key.py)."""
    return ApiConfig(
        nats_url=args.nats,
        api_key=api_key_from_args(args, args.host),
        allowed_hosts=allowed_hosts(args.host, tuple(args.allowed_host)),
        cors_origins=tuple(args.cors_origin),
        max_tokens_limit=args.max_tokens_limit,
        liveness_timeout=args.liveness_timeout,
    )


def run(args: argparse.Namespace) -> int:
    from exojet.api.main import serve

    try:
        config = api_config(args)
    except (BadApiKeyFile, NoApiKey) as err:
        return fail(f"{type(err).__name__}: {err}")
    return serve(config, args.host, args.port)
