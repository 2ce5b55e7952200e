"""`exojet place`, `exojet delete`, `exojet drain` and `exojet undrain`.

These only publish commands on `exo.commands`; the supervisors' reconcilers do
the rest. An instance's id follows from its command: `inst-<seq>` (see bus/ids.py).
Routed chats are read by `bus/nats/chat_session.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

from exojet.bus import subjects
from exojet.bus.commands import DeleteInstance, DrainRunner, PlaceInstance, UndrainRunner
from exojet.bus.ids import instance_id_of
from exojet.bus.model_ids import model_id_problem
from exojet.bus.nats import client
from exojet.bus.nats.connection import DEDUPED_PUBLISH_TRY_S as PUBLISH_TRY_S
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.cli.options import Subparsers, add_nats, add_wait_timeout, fail
from exojet.cli.progress import ProgressBars
from exojet.projections.placing import shown_reason

# How often `place --wait` asks the supervisor while the instance is on its way.
WAIT_POLL_S = 0.25
SETTLED = ("Ready", "Deleted")


def add_parsers(sub: Subparsers) -> None:
    """Register `place`, `delete`, `drain` and `undrain` on the `exojet` subparsers."""
    p = sub.add_parser("place", help="ask the supervisors to place MODEL on runners; prints the instance id")
    p.add_argument("model_id", help="the model to place, e.g. exojet/SmolLM2-135M-Instruct-Q4")
    p.add_argument("--runners", default=None, help="comma-separated runner ids (default: the freest Idle ones)")
    p.add_argument("--min-runners", type=int, default=1, help="how many runners share the model (pipeline)")
    p.add_argument(
        "--n-layers",
        type=int,
        default=None,
        help="the model's layer count, an override (default: what the runners' downloads report)",
    )
    p.add_argument("--wait", action="store_true", help="follow the instance to Ready (exit 0) or Failed (exit 1)")
    add_wait_timeout(p)
    add_nats(p)
    p.set_defaults(func=run)
    p = sub.add_parser("delete", help="delete an instance: its runners unload it and are Idle again")
    p.add_argument("instance_id", help="the instance id `exojet place` printed (see `exojet state`)")
    add_nats(p)
    p.set_defaults(func=run)
    p = sub.add_parser("drain", help="move a runner's instances elsewhere and place nothing on it (maintenance)")
    p.add_argument("runner_id", help="the runner to drain")
    p.add_argument("--wait", action="store_true", help="until it holds no instance and is Idle")
    add_wait_timeout(p)
    add_nats(p)
    p.set_defaults(func=run)
    p = sub.add_parser("undrain", help="let the supervisors place instances on a drained runner again")
    p.add_argument("runner_id", help="the drained runner")
    add_nats(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `place`, `delete`, `drain` or `undrain` from parsed arguments."""
    if args.command == "place":
        runners = tuple(r for r in args.runners.split(",") if r) if args.runners else None
        return asyncio.run(
            place(args.nats, args.model_id, runners, args.min_runners, args.n_layers, args.wait, args.timeout)
        )
    if args.command == "drain":
        return asyncio.run(drain(args.nats, args.runner_id, True, args.wait, args.timeout))
    if args.command == "undrain":
        return asyncio.run(drain(args.nats, args.runner_id, False, False, 0.0))
    return asyncio.run(delete(args.nats, args.instance_id))


async def place(
    nats_url: str,
    model_id: str,
    runners: tuple[str, ...] | None,
    min_runners: int,
    n_layers: int | None,
    wait: bool,
    timeout: float,
) -> int:
    """Publish PlaceInstance and print the instance id; with `wait`, follow it to Ready or Failed."""
    if problem := model_id_problem(model_id):
        return fail(problem, 2)
    for runner_id in runners or ():
        if problem := subjects.id_problem(runner_id):
            return fail(problem, 2)
    if min_runners < 1 or (n_layers is not None and n_layers < 1):
        return fail("--min-runners and --n-layers must be at least 1", 2)
    command = PlaceInstance(model_id=model_id, runners=runners, min_runners=min_runners, n_layers=n_layers)
    nc = await client.connect(nats_url, name="exojet-place")
    try:
        # Under a Nats-Msg-Id, so a publish whose ack was lost to a cut-off server is tried again
        # (the server answers a duplicate with the first one's sequence: still one instance).
        ack = await client.publish(
            nc.jetstream(), subjects.COMMANDS, command, msg_id=f"place-{uuid.uuid4().hex}", timeout=PUBLISH_TRY_S
        )
        instance_id = instance_id_of(None, ack.seq)
        print(instance_id, flush=True)
        if not wait:
            return 0
        return await _wait_instance(nc, instance_id, ack.seq, timeout)
    finally:
        await nc.close()


async def _wait_instance(nc: Any, instance_id: str, seq: int, timeout: float) -> int:
    shown = None
    bars = ProgressBars(sys.stderr)
    sub = await client.follow(nc, bars.on_event, start_seq=seq, subject=f"{subjects.RUNNER_EVENTS_PREFIX}.>")
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    # Waits for a supervisor through an election or a reconnect (the query's bound),
                    # then fails naming why: nobody answered that long.
                    reply = await query(nc, "instance", instance_id=instance_id, min_seq=seq)
                except QueryFailed as err:
                    if not (err.answered and err.code == "Timeout"):
                        return fail(f"{err.code}: {err.message}")
                    reply = None  # a supervisor answered, its fold behind (catching up): ask again
                if reply is not None:
                    inst = reply.instance
                    reason = shown_reason(inst.reason, reply.waiting)
                    status = inst.status + (f" ({reason})" if reason else "")
                    if status != shown:
                        bars.say(f"  {instance_id}: {status}")
                        shown = status
                    if inst.status in SETTLED or inst.gave_up:
                        return 0 if inst.status == "Ready" else 1
                await asyncio.sleep(WAIT_POLL_S)  # poll interval of a bounded wait, not a sync point
    except TimeoutError:
        return fail(f"{instance_id} was not Ready within {timeout} s (last: {shown or 'no supervisor answer'})")
    finally:
        bars.stop()
        if sub is not None:
            await sub.unsubscribe()


async def delete(nats_url: str, instance_id: str) -> int:
    """Publish DeleteInstance; the supervisors unload its runners (UnloadModel)."""
    nc = await client.connect(nats_url, name="exojet-delete")
    try:
        ack = await client.publish(nc.jetstream(), subjects.COMMANDS, DeleteInstance(instance_id=instance_id))
        print(f"delete of {instance_id} requested (seq {ack.seq})")
        return 0
    finally:
        await nc.close()


async def drain(nats_url: str, runner_id: str, on: bool, wait: bool, timeout: float) -> int:
    """Publish DrainRunner (or UndrainRunner); with `wait`, until the runner is Idle holding no instance."""
    if problem := subjects.id_problem(runner_id):
        return fail(problem, 2)
    command = DrainRunner(runner_id=runner_id) if on else UndrainRunner(runner_id=runner_id)
    nc = await client.connect(nats_url, name="exojet-drain")
    holding: list[str] | None = None
    try:
        ack = await client.publish(nc.jetstream(), subjects.COMMANDS, command)
        print(f"{'drain' if on else 'undrain'} of {runner_id} requested (seq {ack.seq})", flush=True)
        if not wait:
            return 0
        async with asyncio.timeout(timeout):
            while (holding := await _drained_holds(nc, runner_id, ack.seq)) != []:
                await asyncio.sleep(WAIT_POLL_S)  # poll interval of a bounded wait, not a sync point
        print(f"{runner_id} is drained: Idle, holding no instance")
        return 0
    except TimeoutError:
        return fail(f"{runner_id} was not drained within {timeout} s (still: {', '.join(holding or ['not Idle'])})")
    except QueryFailed as err:
        return fail(f"{err.code}: {err.message}")
    finally:
        await nc.close()


async def _drained_holds(nc: Any, runner_id: str, seq: int) -> list[str] | None:
    """The live instances placed on the runner ([] once it is Idle holding none; None: not known yet)."""
    try:
        reply = await query(nc, "runner", runner_id=runner_id, min_seq=seq)
    except QueryFailed as err:
        if err.code != "NotFound":  # not folded its registration yet; anything else waited the bound
            raise
        return None
    placed = [iid for iid, inst in reply.instances.items() if any(p.runner_id == runner_id for p in inst.placements)]
    return placed if placed or reply.runner.status != "RunnerIdle" else []
