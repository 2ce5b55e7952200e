"""`exojet`: one entry point that dispatches to the parts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bus.client import default_url


def _add_nats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=default_url(), help="NATS URL (default $NATS_URL, else nats://127.0.0.1:4222)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `exojet` subcommand."""
    parser = argparse.ArgumentParser(prog="exojet", description="Event-sourced LLM runners on NATS JetStream")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("runner", help="run a runner process")
    p.add_argument("--id", required=True, help="runner id (letters, digits, '-', '_')")
    p.add_argument("--models-dir", type=Path, default=None, help="models dir (default $EXO_MODELS_DIR or ~/.local/share/exo/models)")
    _add_nats(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    match args.command:
        case "runner":
            from runner.main import main as runner_main

            return runner_main(runner_id=args.id, nats_url=args.nats, models_dir=args.models_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
