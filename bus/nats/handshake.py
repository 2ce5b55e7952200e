"""The NATS handshake on a plain asyncio stream: INFO, TLS upgrade, CONNECT with credentials, PING/PONG.

Used by the log reader's own connection, and before nats-py connects to name a refusal
(nats-py can wait forever closing a socket whose TLS handshake failed, and its errors
do not say which credential was wrong). Every step is bounded by `timeout`.

Protocol: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import asyncio
import json
import ssl
from urllib.parse import ParseResult

from exojet.bus.nats.connect_options import BadCredentials, ConnectOptions

READ_LIMIT = 4 * 1024 * 1024


class NatsUnreachable(ConnectionError):
    """No NATS server answered at the URL."""


class NatsRefused(ConnectionError):
    """The server answered but refused us: TLS trust or credentials (the message names which)."""


async def open_connection(
    url: ParseResult, options: ConnectOptions, name: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection past CONNECT (the server answered our PING); raises NatsUnreachable or NatsRefused."""
    where = f"{url.hostname}:{url.port or 4222}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(url.hostname, url.port or 4222, limit=READ_LIMIT), timeout
        )
    except (OSError, TimeoutError) as err:
        raise NatsUnreachable(f"cannot reach NATS at {where}: {err!r}") from None
    try:
        await asyncio.wait_for(_handshake(reader, writer, url, options, name, where), timeout)
    except TimeoutError:
        writer.close()
        raise NatsUnreachable(f"NATS at {where} did not complete the handshake within {timeout} s") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    url: ParseResult,
    options: ConnectOptions,
    name: str,
    where: str,
) -> None:
    info_line = await reader.readline()
    if not info_line.startswith(b"INFO "):
        raise NatsUnreachable(f"not a NATS server at {where}: {info_line[:80]!r}")
    info = json.loads(info_line[5:])
    try:
        context = options.ssl_context()
        fields = options.connect_fields(info.get("nonce"))
    except BadCredentials as err:
        raise NatsRefused(str(err)) from None
    if info.get("tls_required"):
        try:
            await writer.start_tls(context or ssl.create_default_context(), server_hostname=url.hostname)
        except ssl.SSLCertVerificationError as err:
            raise NatsRefused(
                f"TLS: the certificate of NATS at {where} is not trusted ({err.verify_message}): "
                "pass --tlsca (or $NATS_CA) with the CA that signed it, e.g. DIR/ca.pem of `exojet auth init --tls`"
            ) from None
        except (ssl.SSLError, OSError) as err:
            raise NatsRefused(f"TLS handshake with NATS at {where} failed: {err}") from None
    elif context is not None:
        raise NatsRefused(f"NATS at {where} does not offer TLS, but TLS options were given")
    if url.username and url.password is not None:
        fields.update(user=url.username, **{"pass": url.password})
    elif url.username:
        fields["auth_token"] = url.username
    connect = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "protocol": 1,
        "lang": "python-exojet",
        "version": "1",
        "name": name,
        "tls_required": bool(info.get("tls_required")),
        **fields,
    }
    writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
    # The PONG (or -ERR) says whether the server accepted us.
    answer = b"INFO"
    while answer.startswith((b"INFO", b"+OK")):
        answer = await reader.readline()
    if answer.startswith(b"PONG"):
        return
    error = answer.strip().decode(errors="replace")
    if "authorization" in error.lower() or "authentication" in error.lower():
        raise NatsRefused(f"NATS at {where} refused the credentials ({error}): {_who(options, fields)}")
    raise NatsRefused(f"NATS at {where} refused the connection: {error}")


def _who(options: ConnectOptions, fields: dict[str, object]) -> str:
    if "nkey" in fields:
        return f"nkey {fields['nkey']} (from {options.nkey}) is not a user of this server"
    if "jwt" in fields:
        return f"the user of {options.creds} is not accepted by this server"
    if "user" in fields:
        return f"user {fields['user']!r} or its password is wrong"
    return "no credentials were given: pass --nkey FILE (or set $EXOJET_NKEY), --creds or --user/--password"


async def refusal(url: ParseResult, options: ConnectOptions, timeout: float) -> NatsRefused | None:
    """Why the server at `url` refuses `options` (TLS trust, credentials), or None: it accepts
    them, or it does not answer (which the caller's retries deal with)."""
    try:
        _, writer = await open_connection(url, options, "exojet-check", timeout)
    except NatsRefused as err:
        return err
    except NatsUnreachable:
        return None
    writer.close()
    return None
