"""`exojet`: one entry point; each command's module registers its parser and its handler."""

from __future__ import annotations

import argparse
import sys

from exojet import __version__
from exojet.bus.nats import connect_options
from exojet.bus.nats.client import NatsRefused, NatsUnreachable
from exojet.bus.nats.stream_setup import ReplicasRefused
from exojet.cli import (
    api_cmd,
    auth_cmd,
    chat_cmd,
    log_cmds,
    models_cmd,
    nats_cmd,
    orchestration_cmds,
    runner_cmd,
    state_cmd,
    supervisor_cmd,
    task_cmd,
    up_cmd,
)
from exojet.cli.logs import setup_logging

# In the order `exojet --help` lists them.
REGISTERS = (
    nats_cmd.add_parser,
    auth_cmd.add_parser,
    supervisor_cmd.add_parser,
    nats_cmd.add_streams_parser,
    orchestration_cmds.add_parsers,
    task_cmd.add_parser,
    state_cmd.add_parser,
    log_cmds.add_parsers,
    up_cmd.add_parser,
    chat_cmd.add_parser,
    api_cmd.add_parser,
    models_cmd.add_parser,
    runner_cmd.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `exojet` command; each sets `func`, its handler."""
    parser = argparse.ArgumentParser(prog="exojet", description="Event-sourced LLM runners on NATS JetStream")
    parser.add_argument("--version", action="version", version=f"exojet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTERS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if hasattr(args, "nkey"):
        connect_options.use(connect_options.from_args(args))
    try:
        code: int = args.func(args)
    except (NatsUnreachable, NatsRefused, ReplicasRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
