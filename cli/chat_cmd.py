"""`exojet chat`: send a ChatCompletion and stream the answer as it is generated."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.nats import client
from exojet.bus.nats.connection import DEDUPED_PUBLISH_TRY_S
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.tasks import DEFAULT_MAX_TOKENS, ChatCompletion, ChatMessage
from exojet.cli.options import Subparsers, add_nats, add_wait_timeout
from exojet.cli.orchestration_cmds import ChatFailed, route_chat
from exojet.cli.task_cmd import wait_task
from exojet.projections.queries import MAX_LIMIT


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("chat", help="ask a Ready runner; the answer streams as it is generated")
    p.add_argument("prompt", help="the user message to send")
    p.add_argument(
        "--runner",
        default=None,
        help="send to this runner directly (default: routed by the supervisors to a Ready instance)",
    )
    p.add_argument("--model", default=None, help="only instances/runners serving this model id")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens to generate (default %(default)s)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    add_wait_timeout(p, "seconds to wait for the whole answer")
    add_nats(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(
        chat(args.nats, args.prompt, args.runner, args.model, args.max_tokens, args.temperature, args.timeout)
    )


async def _ready_runner(nc: NATS, wanted: str | None, model_id: str | None) -> str | None:
    """The named runner if Ready, else the Ready runner (with `model_id`) with the fewest unfinished tasks."""
    if wanted is not None:
        try:
            reply = await query(nc, "runner", runner_id=wanted, limit=0)
        except QueryFailed as err:
            if err.code == "NotFound":
                return None
            raise
        return wanted if reply["runner"]["status"] == "RunnerReady" else None
    reply = await query(nc, "state", sections=["runners"], runner_status="RunnerReady", limit=MAX_LIMIT)
    ready: list[str] = [r["runner_id"] for r in reply["runners"].values() if model_id in (None, r["model_id"])]
    load: dict[str, int] = reply["load"]
    return min(sorted(ready), key=lambda rid: load.get(rid, 0)) if ready else None


async def _statuses(nc: NATS) -> str:
    """The runners and their statuses, for an error message (the first page of them)."""
    reply = await query(nc, "state", sections=["runners"], limit=20)
    shown = ", ".join(f"{r['runner_id']} {r['status'].removeprefix('Runner')}" for r in reply["runners"].values())
    more = reply["runners_page"]["total"] - len(reply["runners"])
    return (shown or "no runners") + (f" and {more} more" if more > 0 else "")


async def _routed(
    nats_url: str, prompt: str, model_id: str | None, max_tokens: int, temperature: float, timeout: float
) -> int:
    try:
        async for text in route_chat(
            nats_url, (ChatMessage("user", prompt),), model_id, max_tokens, temperature, timeout
        ):
            print(text, end="", flush=True)
    except ChatFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"\nerror: no answer within {timeout} s", file=sys.stderr)
        return 1
    print()
    return 0


async def chat(
    nats_url: str,
    prompt: str,
    runner_id: str | None,
    model_id: str | None,
    max_tokens: int,
    temperature: float,
    timeout: float,
) -> int:
    """Stream the answer to `prompt`: routed by the supervisors to a Ready instance (of `model_id`),
    else sent to a Ready runner (the named one, or the least busy); non-zero when nothing is Ready."""
    nc = await client.connect(nats_url, name="exojet-chat")
    try:
        try:
            if runner_id is None:
                ready = await query(nc, "state", sections=["instances"], instance_status="Ready", limit=MAX_LIMIT)
                if any(model_id in (None, i["model_id"]) for i in ready["instances"].values()):
                    await nc.close()
                    return await _routed(nats_url, prompt, model_id, max_tokens, temperature, timeout)
            target = await _ready_runner(nc, runner_id, model_id)
            if target is None:
                who = f"runner {runner_id} is not" if runner_id else "no runner is"
                print(f"error: {who} Ready ({await _statuses(nc)}); start one with `exojet up`", file=sys.stderr)
                return 1
        except QueryFailed as err:
            print(f"error: {err.code}: {err.message}", file=sys.stderr)
            return 1
        task = ChatCompletion(
            task_id=f"chat-{uuid.uuid4().hex[:12]}",
            messages=(ChatMessage("user", prompt),),
            max_tokens=max_tokens,
            temperature=temperature,
        )
        js = nc.jetstream()
        ack = await client.publish(
            js, subjects.task_subject(target), encode(task), msg_id=task.task_id, timeout=DEDUPED_PUBLISH_TRY_S
        )
        assert task.task_id is not None
        return await wait_task(
            nc, target, task.task_id, ack.seq, task.task_id, chat=True, timeout=timeout, verbose=False
        )
    finally:
        if not nc.is_closed:
            await nc.close()
