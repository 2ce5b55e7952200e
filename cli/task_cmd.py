"""`exojet task`: validate and publish a task on a runner's queue, and follow it to its end."""

from __future__ import annotations

import argparse
import asyncio
import sys

from exojet.bus import subjects
from exojet.bus.chat_ends import ChatError, ChatUnfinished
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.codec import BadInput, decode_task
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.chat_client import chat_session
from exojet.bus.tasks import ChatCompletion
from exojet.cli.options import Subparsers, add_nats, add_wait_timeout, fail


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("task", help="validate and publish a task on exo.tasks.RUNNER_ID")
    p.add_argument("runner_id", help="the runner whose queue gets the task (exo.tasks.RUNNER_ID)")
    p.add_argument("json", help='the task, e.g. \'{"type":"StartWarmup"}\'')
    p.add_argument("--wait", action="store_true", help="follow it to its terminal status (print a chat's text)")
    add_wait_timeout(p)
    add_nats(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(publish_task(args.nats, args.runner_id, args.json, args.wait, args.timeout))


async def publish_task(nats_url: str, runner_id: str, payload: str, wait: bool, timeout: float) -> int:
    """Validate and publish a task; with `wait`, follow it to its terminal status (a chat's text as
    it comes), read by a `ChatSession` as `exojet chat` reads its chats."""
    if problem := subjects.id_problem(runner_id):
        return fail(problem, 2)
    data = payload.encode()
    try:
        task = decode_task(data)
    except BadInput as err:
        return fail(f"{err.error_type}: {err.message}", 2)
    async with chat_session(nats_url, "exojet-cli", keep_unclaimed=True) as session:
        ack = await client.publish(session.js, subjects.task_subject(runner_id), data, msg_id=task.task_id)
        task_id = task.task_id or str(ack.seq)
        print(f"task {task_id} seq {ack.seq}" + (" (duplicate)" if ack.duplicate else ""))
        if not wait:
            return 0
        chat = isinstance(task, ChatCompletion)
        stream_id = (task.stream_id if isinstance(task, ChatCompletion) else None) or task_id
        stream = await session.follow_task(runner_id, task_id, stream_id, ready=False)
        stream.on_status = _print_status
        try:
            async with asyncio.timeout(timeout):
                async for piece in session.answer(stream):
                    if isinstance(piece, str):
                        print(piece, end="", flush=True)
                    elif isinstance(piece, ChoiceDelta) and piece.choice == 0:
                        # A task asking for logprobs or `n`: its first answer's text.
                        print(piece.text, end="", flush=True)
        except ChatUnfinished:
            return 1  # its status line said why
        except ChatError as err:
            return fail(("\n" if chat else "") + str(err))
        except TimeoutError:
            return fail(f"task {task_id} reached no terminal status within {timeout} s")
        finally:
            session.close(stream, "exojet task --wait ended")
        if chat:
            print()
        return 0


def _print_status(event: TaskStatusUpdated) -> None:
    error = f" ({event.error_type}: {event.error_message})" if event.error_type else ""
    print(f"  {event.task_status}{error}", file=sys.stderr)
