"""Options several `exojet` commands share: where NATS is (and its credentials), stream replicas,
engines, the models dir, how long `--wait` waits (each command module adds the ones it takes);
and the error line they print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeAlias, get_args

from exojet.bus.nats import connect_options
from exojet.bus.nats.connection import DEFAULT_URL, BadNatsUrl, default_url, server_urls
from exojet.bus.nats.stream_setup import wanted_replicas
from exojet.bus.streams import CLUSTER_REPLICAS
from exojet.models.store import default_models_dir
from exojet.runner.engine_choice import EngineWanted

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# How long a command given `--wait` (or a chat) waits for the end it waits for.
WAIT_TIMEOUT_S = 600.0


def _nats_url(value: str) -> str:
    """argparse's check of `--nats` (and of `$NATS_URL`, its default): a named error, not a traceback."""
    try:
        server_urls(value)
    except BadNatsUrl as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_nats(p: argparse.ArgumentParser) -> None:
    """`--nats` and the `nats` CLI's credentials (`--nkey`, `--creds`, ...)."""
    p.add_argument(
        "--nats",
        type=_nats_url,
        default=default_url(),
        help=f"NATS server URL, or several comma-separated (a cluster) (default $NATS_URL, else {DEFAULT_URL})",
    )
    connect_options.add_arguments(p)


def add_replicas(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicas",
        type=int,
        choices=range(1, 6),
        default=wanted_replicas(),
        help="replicas of the streams if this creates them "
        f"(default $EXO_REPLICAS, else {CLUSTER_REPLICAS} on a cluster, 1 alone)",
    )


def add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default=get_args(EngineWanted)[0],
        choices=get_args(EngineWanted),
        help="engines a model may load on (auto: the fastest installed that runs the model)",
    )


def add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="models dir (default $EXO_MODELS_DIR, else ~/.local/share/exo/models)",
    )


def add_wait_timeout(p: argparse.ArgumentParser, what: str = "with --wait: seconds before giving up") -> None:
    p.add_argument("--timeout", type=float, default=WAIT_TIMEOUT_S, help=f"{what}, exit 1 (default %(default)g)")


def fail(message: str, code: int = 1) -> int:
    """Say what went wrong on stderr, as every command does; the exit code to return."""
    print(f"error: {message}", file=sys.stderr)
    return code
