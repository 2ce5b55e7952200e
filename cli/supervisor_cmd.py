"""`exojet supervisor`: fold the log, answer queries, plan and reconcile, declare silent runners lost."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from exojet.bus.streams import LOG_MAX_AGE_S, LOG_MAX_BYTES, LogLimits
from exojet.bus.views import Retention
from exojet.cli.options import Subparsers, add_nats, add_replicas
from exojet.supervisor.actions import DEFAULT_CONFIG as PLANNER
from exojet.supervisor.actions import PlannerConfig
from exojet.supervisor.liveness import DEFAULT_HEARTBEAT_TIMEOUT_S
from exojet.supervisor.projector import DEFAULT_SNAPSHOT_EVERY

GROUP_PORTS = f"{PLANNER.port_base}-{PLANNER.port_base + PLANNER.port_count - 1}"


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("supervisor", help="run a supervisor: fold the log, serve exo.supervisor.* queries")
    p.add_argument("--id", default=None, help="supervisor id (default host-pid)")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=DEFAULT_SNAPSHOT_EVERY,
        help="store a snapshot every N events (default %(default)s)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=DEFAULT_HEARTBEAT_TIMEOUT_S,
        help="declare a runner lost after this many seconds without a heartbeat or event (default %(default)g)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=PLANNER.max_attempts,
        help="attempts in a row that fail before Ready after which an instance stays Failed (default %(default)s)",
    )
    _add_retention(p)
    p.add_argument(
        "--max-queue",
        type=int,
        default=PLANNER.max_chats_per_instance,
        help="routed chats that may wait in an instance's runner queue once it serves as many as it can; "
        "past it a chat is refused (ChatRefused, HTTP 429) (default %(default)s)",
    )
    p.add_argument(
        "--group-ports",
        default=GROUP_PORTS,
        help="port range START-END that pipeline groups listen on (default %(default)s)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="read layer counts from models here (an override: runners report them when their downloads complete)",
    )
    add_replicas(p)
    add_nats(p)
    p.set_defaults(func=run)


def _add_retention(p: argparse.ArgumentParser) -> None:
    """What the projection keeps, and the limits a supervisor may set on EXO_LOG."""
    kept = Retention()
    p.add_argument(
        "--keep-finished",
        type=int,
        default=kept.finished,
        help="finished tasks, chats and ended instances kept in the projection (each; older ones: the log) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--keep-age",
        type=float,
        default=kept.age_s,
        help="seconds (of log time) finished work stays in the projection (default %(default)g)",
    )
    p.add_argument(
        "--keep-anomalies", type=int, default=kept.anomalies, help="newest anomalies kept (default %(default)s)"
    )
    p.add_argument(
        "--log-max-age",
        type=float,
        default=None,
        help=f"set EXO_LOG's max age in seconds, 0 = none (a new log gets {LOG_MAX_AGE_S:g})",
    )
    p.add_argument(
        "--log-max-bytes",
        type=int,
        default=None,
        help=f"set EXO_LOG's max size in bytes, 0 = none (a new log gets {LOG_MAX_BYTES})",
    )


def log_limits(max_age: float | None, max_bytes: int | None) -> LogLimits | None:
    """The limits a supervisor sets on EXO_LOG, if told any (the other one stays the default)."""
    if max_age is None and max_bytes is None:
        return None
    default = LogLimits()
    return LogLimits(
        max_age_s=default.max_age_s if max_age is None else max_age,
        max_bytes=default.max_bytes if max_bytes is None else max_bytes,
    )


def run(args: argparse.Namespace) -> int:
    from exojet.supervisor.main import run_supervisor

    start, _, end = args.group_ports.partition("-")
    planner = PlannerConfig(
        max_attempts=args.max_attempts,
        port_base=int(start),
        port_count=int(end or start) - int(start) + 1,
        max_chats_per_instance=args.max_queue,
    )
    return asyncio.run(
        run_supervisor(
            args.nats,
            args.id,
            args.snapshot_every,
            heartbeat_timeout=args.heartbeat_timeout,
            models_dir=args.models_dir,
            planner=planner,
            retention=Retention(finished=args.keep_finished, age_s=args.keep_age, anomalies=args.keep_anomalies),
            log_limits=log_limits(args.log_max_age, args.log_max_bytes),
            replicas=args.replicas,
        )
    )
