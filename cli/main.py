"""`exojet`: one entry point that dispatches to the parts."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bus.client import default_url


def _add_nats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=default_url(), help="NATS URL (default $NATS_URL, else nats://127.0.0.1:4222)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `exojet` subcommand."""
    parser = argparse.ArgumentParser(prog="exojet", description="Event-sourced LLM runners on NATS JetStream")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nats", help="run the embedded nats-server (repo's nats.conf) in the foreground")
    p.add_argument("--port", type=int, default=4222)
    p.add_argument("--monitor-port", type=int, default=8222)
    p.add_argument("--store-dir", type=Path, default=None, help="JetStream store (default ~/.local/share/exo/nats)")

    p = sub.add_parser("supervisor", help="run a supervisor: fold the log, serve exo.supervisor.* queries")
    p.add_argument("--id", default=None, help="supervisor id (default host-pid)")
    p.add_argument("--snapshot-every", type=int, default=10_000, help="store a snapshot every N events")
    _add_nats(p)

    p = sub.add_parser("task", help="validate and publish a task on exo.tasks.RUNNER_ID")
    p.add_argument("runner_id")
    p.add_argument("json", help='the task, e.g. \'{"type":"StartWarmup"}\'')
    p.add_argument("--wait", action="store_true", help="follow it to its terminal status (print a chat's text)")
    p.add_argument("--timeout", type=float, default=600.0)
    _add_nats(p)

    p = sub.add_parser("state", help="the supervisor's projection")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runner", default=None)
    g.add_argument("--task", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--min-seq", type=int, default=0, help="answer once the projection reached this seq")
    _add_nats(p)

    p = sub.add_parser("replay", help="the log's timeline, rebuilt locally (no supervisor needed)")
    p.add_argument("--runner", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--from", dest="from_seq", type=int, default=1)
    p.add_argument("--to", dest="to_seq", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object a line: seq, subject, time, message")
    p.add_argument("--state", action="store_true", help="print the projection as of --to")
    p.add_argument("--check", action="store_true",
                   help="list anomalies, unfinished tasks and stuck runners; exit 1 if any")
    _add_nats(p)

    p = sub.add_parser("runner", help="run a runner process")
    p.add_argument("--id", required=True, help="runner id (letters, digits, '-', '_')")
    p.add_argument("--models-dir", type=Path, default=None, help="models dir (default $EXO_MODELS_DIR or ~/.local/share/exo/models)")
    _add_nats(p)
    return parser


def _run_nats(port: int, monitor_port: int, store_dir: Path | None) -> int:
    from bus.server import NatsServer

    server = NatsServer(port=port, monitor_port=monitor_port, store_dir=store_dir).start()
    print(f"nats-server on {server.url} (store {server.store_dir}); Ctrl-C stops it", flush=True)
    try:
        return server.process.wait() if server.process else 1
    except KeyboardInterrupt:
        server.stop()
        return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    match args.command:
        case "nats":
            return _run_nats(args.port, args.monitor_port, args.store_dir)
        case "supervisor":
            from supervisor.main import run_supervisor

            return asyncio.run(run_supervisor(args.nats, args.id, args.snapshot_every))
        case "task":
            from cli.log_cmds import publish_task

            return asyncio.run(publish_task(args.nats, args.runner_id, args.json, args.wait, args.timeout))
        case "state":
            from cli.log_cmds import show_state

            return asyncio.run(show_state(args.nats, args.runner, args.task, args.json, args.min_seq))
        case "replay":
            from cli.log_cmds import replay_log

            return asyncio.run(replay_log(args.nats, args.runner, args.task, args.from_seq, args.to_seq, args.json,
                                          args.state, args.check))
        case "runner":
            from runner.main import main as runner_main

            return runner_main(runner_id=args.id, nats_url=args.nats, models_dir=args.models_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
