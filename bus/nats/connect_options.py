"""How a process proves who it is to NATS: the `nats` CLI's options, for nats-py and our own connections.

`--nkey FILE` (or `$EXOJET_NKEY` / `$NATS_NKEY`), `--creds FILE`, `--user/--password`
and `--tlsca/--tlscert/--tlskey` become nats-py connect keywords. With an nkey, the
inbox prefix is `_INBOX.<public key>`: the server lets each identity subscribe only
its own prefix, so no identity sees another's replies (docs/security.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

_CREDS_BLOCK = re.compile(r"-{3,}[^\n]*-{3,}\s*\n([A-Za-z0-9_\-\.=]+)\s*\n-{3,}[^\n]*END[^\n]*-{3,}")


class BadCredentials(ValueError):
    """A credential file is missing, unreadable or not what its option says."""


@dataclass(frozen=True)
class ConnectOptions:
    """Credentials and TLS files of one connection (all optional: none is an anonymous plain connection)."""

    nkey: Path | None = None
    creds: Path | None = None
    user: str | None = None
    password: str | None = None
    tlsca: Path | None = None
    tlscert: Path | None = None
    tlskey: Path | None = None

    @classmethod
    def from_env(cls) -> ConnectOptions:
        """The options the environment gives (the same variables as the flags' defaults)."""
        return cls(**{field: value for field, (_, value) in _env_defaults().items()})

    def seed(self) -> bytes:
        """The nkey seed from `nkey` (a file holding an `SU...` seed), raising BadCredentials."""
        assert self.nkey is not None
        try:
            seed = self.nkey.read_bytes().strip()
        except OSError as err:
            raise BadCredentials(f"cannot read nkey seed file {self.nkey}: {err.strerror}") from None
        if not seed.startswith(b"SU"):
            raise BadCredentials(f"{self.nkey} holds no user nkey seed (one line starting with 'SU')")
        return seed

    def public_key(self) -> str | None:
        """The nkey's public key (`U...`), None without an nkey."""
        if self.nkey is None:
            return None
        return str(_keypair(self.seed(), self.nkey).public_key.decode())

    def inbox_prefix(self) -> str:
        """`_INBOX.<public key>` with an nkey (the only inbox its permissions allow), else `_INBOX`."""
        public = self.public_key()
        if public:
            return f"_INBOX.{public}"
        if self.user:
            return f"_INBOX.{self.user}"
        return "_INBOX"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting `tlsca` (and presenting `tlscert`/`tlskey`), None without TLS options."""
        if not (self.tlsca or self.tlscert):
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(self.tlsca) if self.tlsca else None)
            if self.tlscert:
                ctx.load_cert_chain(str(self.tlscert), str(self.tlskey) if self.tlskey else None)
        except (OSError, ssl.SSLError) as err:
            raise BadCredentials(f"cannot load TLS files (--tlsca/--tlscert/--tlskey): {err}") from None
        return ctx

    def nats_kwargs(self) -> dict[str, Any]:
        """Keywords for `nats.connect` (validated: a bad file raises BadCredentials here, not mid-connect)."""
        kwargs: dict[str, Any] = {"inbox_prefix": self.inbox_prefix()}
        if self.nkey is not None:
            kwargs["nkeys_seed_str"] = self.seed().decode()
        if self.creds is not None:
            _read_creds(self.creds)
            kwargs["user_credentials"] = str(self.creds)
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["password"] = self.password or ""
        tls = self.ssl_context()
        if tls is not None:
            kwargs["tls"] = tls
        return kwargs

    def connect_fields(self, nonce: str | None) -> dict[str, Any]:
        """The credential fields of a NATS protocol CONNECT, signing the server's `nonce` when a key needs it."""
        fields: dict[str, Any] = {}
        if self.nkey is not None:
            kp = _keypair(self.seed(), self.nkey)
            fields["nkey"] = kp.public_key.decode()
            fields["sig"] = _sign(kp, nonce)
        elif self.creds is not None:
            jwt, seed = _read_creds(self.creds)
            fields["jwt"] = jwt
            fields["sig"] = _sign(_keypair(seed, self.creds), nonce)
        if self.user is not None:
            fields["user"] = self.user
            fields["pass"] = self.password or ""
        return fields


def _keypair(seed: bytes, source: Path) -> Any:
    try:
        return nkeys.from_seed(bytearray(seed))
    except nkeys.NkeysError as err:
        raise BadCredentials(f"{source} holds no valid nkey seed ({type(err).__name__})") from None


def _sign(kp: Any, nonce: str | None) -> str:
    signed = kp.sign((nonce or "").encode())
    return base64.urlsafe_b64encode(signed).decode().rstrip("=")


def _read_creds(path: Path) -> tuple[str, bytes]:
    """(user JWT, seed) of a `.creds` file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise BadCredentials(f"cannot read creds file {path}: {err.strerror}") from None
    blocks = _CREDS_BLOCK.findall(text)
    if len(blocks) < 2:
        raise BadCredentials(f"{path} is not a NATS .creds file (a user JWT and an nkey seed)")
    return blocks[0], blocks[1].encode()


def _env_defaults() -> dict[str, tuple[str, Any]]:
    """Each option's flag help and its environment default."""

    def path(*names: str) -> Path | None:
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        return Path(value) if value else None

    return {
        "nkey": ("nkey seed file ($EXOJET_NKEY, $NATS_NKEY)", path("EXOJET_NKEY", "NATS_NKEY")),
        "creds": ("NATS .creds file ($NATS_CREDS)", path("NATS_CREDS")),
        "user": ("user name ($NATS_USER)", os.environ.get("NATS_USER")),
        "password": ("password ($NATS_PASSWORD)", os.environ.get("NATS_PASSWORD")),
        "tlsca": ("CA certificate that signed the server's ($NATS_CA)", path("NATS_CA")),
        "tlscert": ("client certificate ($NATS_CERT)", path("NATS_CERT")),
        "tlskey": ("client certificate's key ($NATS_KEY)", path("NATS_KEY")),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--nkey --creds --user --password --tlsca --tlscert --tlskey`, defaulting to the environment."""
    for field, (help_text, default) in _env_defaults().items():
        kind = str if field in ("user", "password") else Path
        parser.add_argument(f"--{field}", type=kind, default=default, help=help_text)


def from_args(args: argparse.Namespace) -> ConnectOptions:
    """The options `add_arguments` parsed."""
    return ConnectOptions(**{field: getattr(args, field) for field in _env_defaults()})


_process_options: ConnectOptions | None = None


def use(options: ConnectOptions) -> None:
    """Make `options` what every connection of this process uses unless it is given others (the CLI sets it)."""
    global _process_options
    _process_options = options


def current() -> ConnectOptions:
    """What `use` set, else what the environment says."""
    return _process_options if _process_options is not None else ConnectOptions.from_env()
