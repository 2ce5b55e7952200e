"""What `exojet api` is configured with, and its defaults: `ApiConfig`, the port, the Host header
names it accepts. No Starlette or uvicorn here, so the CLI reads the defaults without loading them."""

from __future__ import annotations

import ipaddress

import msgspec

from exojet.api.chat_request import DEFAULT_MAX_TOKENS_LIMIT

# DEFAULT_LIVENESS_TIMEOUT_S: a chat whose runner has sent no heartbeat for this long ends with an
# error (the chat session's); LOOPBACK_NAMES: the names of this host only, as nats-server's check.
from exojet.bus.nats.chat_session import DEFAULT_LIVENESS_TIMEOUT_S
from exojet.bus.ops.server import LOOPBACK_NAMES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 52415


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    api_key: str | None = None
    # Host header names accepted (None: any). A loopback API accepts only
    # loopback names, so a web page on a rebound domain cannot reach it.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    cors_origins: tuple[str, ...] = ()
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT_S
    route_timeout: float = 10.0


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, maybe in brackets) is one of the loopback names."""
    return host.strip("[]").lower() in LOOPBACK_NAMES


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
