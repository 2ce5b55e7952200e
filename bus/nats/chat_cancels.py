"""Cancelling a chat: its rank tasks (`CancelTask` beside each runner's queue), or, before any
rank runs, the chat itself (`CancelChat` in the log, so no supervisor routes it later)."""

from __future__ import annotations

from loguru import logger
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from exojet.bus import subjects
from exojet.bus.cancel import CancelTask
from exojet.bus.commands import CancelChat
from exojet.bus.ids import chat_task_id
from exojet.bus.nats import client
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.statuses import TERMINAL_TASK_STATUSES

# The most ranks a cancel by id looks up when this process did not start the chat.
MAX_RANKS = 64
log = logger.bind(component="chat")


async def find_tasks(nc: NATS, chat_id: str) -> dict[str, str]:
    """The unfinished rank tasks of `chat_id` (task id -> runner id), asked of the supervisors
    (QueryFailed when none answers)."""
    tasks = {}
    for rank in range(MAX_RANKS):
        task_id = chat_task_id(chat_id, rank)
        try:
            reply = await query(nc, "task", timeout=2.0, task_id=task_id)
        except QueryFailed as err:
            if err.code == "NotFound":
                break
            raise
        if reply.task.status not in TERMINAL_TASK_STATUSES:
            tasks[task_id] = reply.task.runner_id
    return tasks


async def cancel_unrouted(js: JetStreamContext, chat_id: str, reason: str) -> None:
    """Tell the supervisors, through the log, never to route `chat_id`."""
    ack = await client.publish(
        js, subjects.COMMANDS, CancelChat(chat_id=chat_id, reason=reason), msg_id=f"{chat_id}:cancel"
    )
    log.bind(chat_id=chat_id, seq=ack.seq).info(f"cancel sent before routing: {reason}")


async def publish_cancel(js: JetStreamContext, task_id: str, runner_id: str, reason: str) -> None:
    """Stop one rank task (its runner reads cancels beside its queue)."""
    ack = await client.publish(
        js, subjects.cancel_subject(runner_id), CancelTask(task_id=task_id, reason=reason), msg_id=f"{task_id}:cancel"
    )
    log.bind(task_id=task_id, runner_id=runner_id, seq=ack.seq).info(f"cancel sent: {reason}")
