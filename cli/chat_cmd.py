"""`exojet chat`: ask a Ready instance (or runner) and stream the answer as it is generated.

The chat is read by a `ChatSession` (bus/nats/chat_session.py), as the API reads its chats: it ends
within seconds, with the reason named, however it ends (refused, its runner lost or silent, its
instance failed or deleted, no supervisor routing it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from exojet.bus import subjects
from exojet.bus.chat_ends import ChatError
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.nats import client
from exojet.bus.nats.chat_client import chat_session
from exojet.bus.nats.chat_session import DEFAULT_ROUTE_TIMEOUT_S, ChatSession
from exojet.bus.nats.chat_stream import ChatStream
from exojet.bus.nats.connection import DEDUPED_PUBLISH_TRY_S
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.queries import MAX_LIMIT
from exojet.bus.sampling import DEFAULT_MAX_TOKENS, Sampling, fields
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.bus.views import InstanceView
from exojet.cli.options import Subparsers, add_nats, add_wait_timeout
from exojet.projections.instances import ENDED_STATUSES, READY


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


class NothingToAsk(Exception):
    """No Ready instance or runner takes the chat (the message says what there is)."""


def _bounds(session: ChatSession) -> dict[str, float]:
    """How long a supervisor's answer is waited for: as long as routing may take (the route timeout)."""
    return {"timeout": min(10.0, session.route_timeout), "wait": session.route_timeout}


def _placed(instances: dict[str, InstanceView]) -> str:
    """The live instances, for an error message: `local/tiny Ready on r1, ...`."""
    shown = [
        f"{i.model_id} {i.status}" + (f" on {','.join(p.runner_id for p in i.placements)}" if i.placements else "")
        for i in instances.values()
        if i.status not in ENDED_STATUSES
    ]
    return ", ".join(shown) or "nothing"


async def _ready_runner(session: ChatSession, wanted: str | None, model_id: str | None) -> str | None:
    """The named runner if Ready, else the Ready runner (with `model_id`) with the fewest unfinished tasks."""
    if wanted is not None:
        try:
            mine = await query(session.nc, "runner", **_bounds(session), runner_id=wanted, limit=0)
        except QueryFailed as err:
            if err.code == "NotFound":
                return None
            raise
        return wanted if mine.runner.status == "RunnerReady" else None
    reply = await query(
        session.nc,
        "state",
        wait=session.route_timeout,
        sections=["runners"],
        runner_status="RunnerReady",
        limit=MAX_LIMIT,
    )
    ready = [r.runner_id for r in reply.runners.values() if model_id in (None, r.model_id)]
    return min(sorted(ready), key=lambda rid: reply.load.get(rid, 0)) if ready else None


async def _statuses(session: ChatSession) -> str:
    """The runners and their statuses, for an error message (the first page of them)."""
    reply = await query(session.nc, "state", **_bounds(session), sections=["runners"], limit=20)
    shown = ", ".join(f"{r.runner_id} {r.status.removeprefix('Runner')}" for r in reply.runners.values())
    more = reply.runners_page.total - len(reply.runners)
    return (shown or "no runners") + (f" and {more} more" if more > 0 else "")


async def _routed(
    session: ChatSession, messages: tuple[ChatMessage, ...], model_id: str | None, sampling: Sampling
) -> ChatStream:
    stream = await session.open_chat()
    command = RouteChatCompletion(
        command_id=stream.command_id, messages=messages, model_id=model_id, **fields(sampling)
    )
    await session.submit(stream, command)
    return stream


async def _direct(session: ChatSession, runner_id: str, task: ChatCompletion) -> ChatStream:
    """Send `task` to the Ready runner `runner_id` itself."""
    assert task.task_id is not None
    stream = await session.follow_task(runner_id, task.task_id, task.task_id, ready=True)
    await client.publish(
        session.js, subjects.task_subject(runner_id), task, msg_id=task.task_id, timeout=DEDUPED_PUBLISH_TRY_S
    )
    return stream


async def _start(
    session: ChatSession,
    messages: tuple[ChatMessage, ...],
    runner_id: str | None,
    model_id: str | None,
    sampling: Sampling,
) -> ChatStream:
    """The chat on its way: routed to a Ready instance, else sent to a Ready runner."""
    instances: dict[str, InstanceView] = {}
    if runner_id is None:
        reply = await query(session.nc, "state", **_bounds(session), sections=["instances"], limit=MAX_LIMIT)
        instances = reply.instances
        mine = [i for i in instances.values() if model_id in (None, i.model_id)]
        if any(i.status == READY for i in mine):
            return await _routed(session, messages, model_id, sampling)
        on_its_way = [i for i in mine if i.status not in ENDED_STATUSES]
        if on_its_way and model_id is not None:
            first = on_its_way[0]
            raise NothingToAsk(f"{first.instance_id} of {model_id} is {first.status}, not Ready yet")
    target = await _ready_runner(session, runner_id, model_id)
    if target is not None:
        task_id = f"chat-{uuid.uuid4().hex[:12]}"
        return await _direct(session, target, ChatCompletion(task_id=task_id, messages=messages, **fields(sampling)))
    if runner_id is not None:
        raise NothingToAsk(f"runner {runner_id} is not Ready ({await _statuses(session)})")
    if model_id is not None:
        raise NothingToAsk(
            f"no instance of {model_id} is placed (placed: {_placed(instances)}); "
            f"place it with `exojet place {model_id}`"
        )
    raise NothingToAsk(f"no runner is Ready ({await _statuses(session)}); start one with `exojet up`")


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
    else sent to a Ready runner (the named one, or the least busy); non-zero, naming why, otherwise."""
    messages = (ChatMessage("user", prompt),)
    route_timeout = min(timeout, DEFAULT_ROUTE_TIMEOUT_S)
    async with chat_session(nats_url, "exojet-chat", route_timeout=route_timeout) as session:
        stream: ChatStream | None = None
        try:
            # Routing is bounded by the route timeout (each query's and the routing's wait).
            stream = await _start(
                session, messages, runner_id, model_id, Sampling(max_tokens=max_tokens, temperature=temperature)
            )
            async with asyncio.timeout(timeout):
                async for piece in session.answer(stream):
                    if isinstance(piece, str):
                        print(piece, end="", flush=True)
        except (ChatError, NothingToAsk) as err:
            return _fail(str(err), stream)
        except QueryFailed as err:
            return _fail(f"{err.code}: {err.message}", stream)
        except TimeoutError:
            return _fail(f"no answer within {timeout:g} s", stream)
        finally:
            if stream is not None:
                session.close(stream, "exojet chat ended")
    print()
    return 0


def _fail(message: str, stream: ChatStream | None) -> int:
    # After text already printed, the error goes on a line of its own.
    print(("\n" if stream is not None and stream.order.next_index else "") + f"error: {message}", file=sys.stderr)
    return 1
