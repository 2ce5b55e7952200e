"""`exojet task`: validate and publish a task on a runner's queue, and follow it to its end."""

from __future__ import annotations

import argparse
import asyncio
import sys

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.chunk_order import read_chunks
from exojet.bus.nats.follower import Follower
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.cli.options import Subparsers, add_nats, add_wait_timeout, fail
from exojet.projections.words import message_of


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
    """Validate and publish a task; with `wait`, follow it to its terminal status."""
    if problem := subjects.id_problem(runner_id):
        return fail(problem, 2)
    data = payload.encode()
    try:
        task = decode_task(data)
    except BadInput as err:
        return fail(f"{err.error_type}: {err.message}", 2)
    nc = await client.connect(nats_url, name="exojet-cli")
    try:
        js = nc.jetstream()
        await stream_setup.ensure_streams(js)
        ack = await client.publish(js, subjects.task_subject(runner_id), data, msg_id=task.task_id)
        task_id = task.task_id or str(ack.seq)
        print(f"task {task_id} seq {ack.seq}" + (" (duplicate)" if ack.duplicate else ""))
        if not wait:
            return 0
        stream_id = (task.stream_id if isinstance(task, ChatCompletion) else None) or task_id
        return await wait_task(nc, runner_id, task_id, ack.seq, stream_id, isinstance(task, ChatCompletion), timeout)
    finally:
        await nc.close()


async def wait_task(
    nc: NATS,
    runner_id: str,
    task_id: str,
    after_seq: int,
    stream_id: str,
    chat: bool,
    timeout: float,
    verbose: bool = True,
) -> int:
    """Follow a published task to its terminal status (printing a chat's chunks); exit code."""
    done: asyncio.Future[TaskStatusUpdated] = asyncio.get_running_loop().create_future()

    def on_event(env: Envelope) -> None:
        message = message_of(env)
        if isinstance(message, TaskStatusUpdated) and message.task_id == task_id:
            failed = message.task_status not in (TaskStatus.RUNNING, TaskStatus.COMPLETE)
            if verbose or failed:
                print(
                    f"  {message.task_status}"
                    + (f" ({message.error_type}: {message.error_message})" if message.error_type else ""),
                    file=sys.stderr,
                )
            if message.task_status in TERMINAL_TASK_STATUSES and not done.done():
                done.set_result(message)

    subs: list[Follower | Subscription] = [
        await client.follow(nc, on_event, start_seq=after_seq + 1, subject=subjects.runner_events_subject(runner_id))
    ]
    if chat:
        subs += await read_chunks(nc, subjects.chunks_subject(runner_id, stream_id), _print_text)
    try:
        final = await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return fail(f"task {task_id} reached no terminal status within {timeout} s")
    finally:
        for sub in subs:
            await sub.unsubscribe()
    if chat:
        print()
    return 0 if final.task_status == TaskStatus.COMPLETE else 1


def _print_text(text: str) -> None:
    print(text, end="", flush=True)
