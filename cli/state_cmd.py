"""`exojet state`: the supervisor's projection, or one runner, task or instance of it."""

from __future__ import annotations

import argparse
import asyncio

import msgspec

from exojet.bus.nats import client
from exojet.bus.nats.query_client import SUPERVISOR_WAIT_S, Endpoint, QueryFailed, query
from exojet.bus.queries import DEFAULT_LIMIT, MAX_LIMIT
from exojet.cli.options import Subparsers, add_nats, fail
from exojet.cli.render import render_reply
from exojet.projections.queries import Paging


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("state", help="the supervisor's projection")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runner", default=None, help="only this runner")
    g.add_argument("--task", default=None, help="only this task")
    g.add_argument("--instance", default=None, help="only this instance")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--min-seq", type=int, default=0, help="answer once the projection reached this seq")
    p.add_argument("--offset", type=int, default=0, help="page: skip this many runners, instances and tasks")
    p.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"page: at most this many of each (max {MAX_LIMIT})"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=SUPERVISOR_WAIT_S,
        help="seconds to wait for a supervisor to answer (through an election), exit 1 (default %(default)g)",
    )
    add_nats(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(
        show_state(
            args.nats,
            Scope(runner_id=args.runner, task_id=args.task, instance_id=args.instance),
            args.json,
            args.min_seq,
            Paging(offset=args.offset, limit=args.limit),
            args.timeout,
        )
    )


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """What `exojet state` asks about: one runner, task or instance, else the whole cluster."""

    runner_id: str | None = None
    task_id: str | None = None
    instance_id: str | None = None

    @property
    def endpoint(self) -> Endpoint:
        return "runner" if self.runner_id else "task" if self.task_id else "instance" if self.instance_id else "state"


async def show_state(nats_url: str, scope: Scope, as_json: bool, min_seq: int, paging: Paging, wait: float) -> int:
    """Print the supervisor's projection (or one runner, task or instance of it), a page at a time,
    waiting up to `wait` seconds for a supervisor to answer."""
    nc = await client.connect(nats_url, name="exojet-cli")
    endpoint = scope.endpoint
    try:
        try:
            reply = await query(
                nc,
                endpoint,
                timeout=min(10.0, wait),
                wait=wait,
                **msgspec.structs.asdict(scope),
                min_seq=min_seq or None,
                offset=paging.offset,
                limit=paging.limit,
            )
        except QueryFailed as err:
            return fail(f"{err.code}: {err.message}")
    finally:
        await nc.close()
    if as_json:
        print(msgspec.json.encode(reply).decode())
    else:
        print(render_reply(reply))
    return 0
