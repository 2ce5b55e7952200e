"""`exojet runner`: run a runner process."""

from __future__ import annotations

import argparse

from exojet.cli.options import Subparsers, add_engine, add_models_dir, add_nats
from exojet.runner.deadlines import CHAT_GRACE_S, CHAT_SECONDS_PER_TOKEN


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("runner", help="run a runner process")
    p.add_argument("--id", required=True, help="runner id (letters, digits, '-', '_')")
    p.add_argument(
        "--deadline",
        action="append",
        default=[],
        metavar="TYPE=SECONDS",
        help="a task type's deadline, from when the runner starts it (a chat's: its base); repeatable",
    )
    p.add_argument(
        "--chat-seconds-per-token",
        type=float,
        default=CHAT_SECONDS_PER_TOKEN,
        help="what each max_tokens adds to a chat's deadline (default %(default)g)",
    )
    p.add_argument(
        "--chat-grace",
        type=float,
        default=CHAT_GRACE_S,
        metavar="SECONDS",
        help="how long chats in flight may run on once a Shutdown or UnloadModel is next, before "
        "they are cancelled (default %(default)g)",
    )
    add_engine(p)
    add_models_dir(p)
    add_nats(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exojet.runner.main import main as runner_main

    return runner_main(
        runner_id=args.id,
        nats_url=args.nats,
        models_dir=args.models_dir,
        deadlines=args.deadline,
        chat_seconds_per_token=args.chat_seconds_per_token,
        engine=args.engine,
        chat_grace_s=args.chat_grace,
    )
