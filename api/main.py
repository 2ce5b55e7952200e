"""`exojet api`: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import ipaddress
import sys

import uvicorn

from exojet.api.app import LOOPBACK_NAMES, ApiConfig, create_app
from exojet.bus.client import NatsUnreachable

DEFAULT_PORT = 52415


def allowed_hosts(host: str, extra: tuple[str, ...]) -> tuple[str, ...] | None:
    """Host header names to accept: loopback names on a loopback bind (no DNS
    rebinding), the bound name elsewhere, any when bound to every address (unless `extra`)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return (*LOOPBACK_NAMES, host.lower(), *extra) if host == "localhost" else (host.lower(), *extra)
    if ip.is_loopback:
        return (*LOOPBACK_NAMES, *extra)
    if ip.is_unspecified:
        return extra or None
    return (str(ip), *extra)


def serve(config: ApiConfig, host: str, port: int) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host=host, port=port, log_level="warning", lifespan="on", access_log=False)
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"exojet API on http://{shown}:{port}/v1 (NATS {config.nats_url})", flush=True)
    try:
        server.run()
    except NatsUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if server.started else 1
