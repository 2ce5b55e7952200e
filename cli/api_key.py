"""The API key of `exojet api` (and of `exojet up`'s API): where it comes from, and the refusal
to serve beyond loopback without one.

A key on the command line is read by every local user in `ps`, so it may also come from a
file (`--api-key-file PATH`, its first line) or from `$EXO_API_KEY`. Precedence: `--api-key`
or `--api-key-file` (only one of them may be given), else `$EXO_API_KEY`, else none. Without a
key the API listens beyond loopback (any `--host` but 127.0.0.1, ::1, localhost) only with
`--allow-no-key`, as `exojet nats` listens beyond loopback only with `--auth`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

from exojet.api.config import is_loopback

API_KEY_ENV = "EXO_API_KEY"


class BadApiKeyFile(ValueError):
    """`--api-key-file` names a file that cannot be read or holds no key."""


class NoApiKey(ValueError):
    """The API would listen beyond loopback with no key, and `--allow-no-key` was not given."""


def add_key_arguments(p: argparse.ArgumentParser) -> None:
    """`--api-key` / `--api-key-file` (one of them) and `--allow-no-key`."""
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /health and /login "
        f"(every local user sees it in ps: prefer --api-key-file or ${API_KEY_ENV})",
    )
    key.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"read the API key from this file's first line (over ${API_KEY_ENV})",
    )
    p.add_argument(
        "--allow-no-key",
        action="store_true",
        help="serve beyond loopback without an API key, open to anyone who reaches it (logs a warning)",
    )


def read_key_file(path: Path) -> str:
    """The key in `path` (its first line, surrounding whitespace stripped), raising BadApiKeyFile."""
    try:
        text = path.read_text()
    except OSError as err:
        raise BadApiKeyFile(f"cannot read API key file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise BadApiKeyFile(f"API key file {path} is not text") from None
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise BadApiKeyFile(f"API key file {path} holds no key (it is empty)")
    return key


def resolve_key(flag: str | None, key_file: Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The key to require: `--api-key`, else `--api-key-file`'s, else `$EXO_API_KEY` (empty: unset)."""
    if flag:
        return flag
    if key_file is not None:
        return read_key_file(key_file)
    return (os.environ if env is None else env).get(API_KEY_ENV) or None


def check_exposure(host: str, key: str | None, allow_no_key: bool, option: str = "--host") -> None:
    """Raise NoApiKey if the API would listen beyond loopback with no key and no `--allow-no-key`;
    with it, log a warning."""
    if key is not None or is_loopback(host):
        return
    if not allow_no_key:
        raise NoApiKey(
            f"refusing to serve the API on {host} without an API key: pass --api-key-file PATH "
            f"(or set ${API_KEY_ENV}), or --allow-no-key to serve it open, or {option} 127.0.0.1"
        )
    logger.warning("serving the API on {} with no API key (--allow-no-key): anyone who reaches it may use it", host)


def api_key_from_args(args: argparse.Namespace, host: str, option: str = "--host") -> str | None:
    """The key `add_key_arguments` parsed (resolved as documented), checked against `host`."""
    key = resolve_key(args.api_key, args.api_key_file)
    check_exposure(host, key, args.allow_no_key, option)
    return key
