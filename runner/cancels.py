"""Cancels a runner reads from `exo.cancel.<runner_id>`, beside its serial task queue
(from when it starts serving on; a core subscription, as for its own subject).

A `CancelTask` for the running chat sets its event (the chat stops at its next
token); one for a task not started yet is kept until that task comes up, which is
then answered `Cancelled` without running. Only the newest `MAX_KEPT` are kept:
cancels for tasks that already ended would otherwise pile up.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from nats.aio.msg import Msg

from exojet.bus.codec import BadInput, decode_cancel

MAX_KEPT = 10_000


class Cancels:
    def __init__(self, runner_id: str) -> None:
        self._asked: dict[str, str] = {}
        self._running: dict[str, asyncio.Event] = {}
        self.log = logger.bind(runner_id=runner_id)

    async def on_message(self, msg: Msg) -> None:
        """Subscription handler for the runner's cancel subject."""
        try:
            cancel = decode_cancel(msg.data)
        except BadInput as err:
            self.log.warning(f"cancel refused ({err.error_type}): {err.message}")
            return
        self.cancel(cancel.task_id, cancel.reason or "cancelled")

    def cancel(self, task_id: str, reason: str) -> None:
        """Cancel `task_id` (the runner's own decision, or a CancelTask's)."""
        self._asked[task_id] = reason
        if len(self._asked) > MAX_KEPT:
            del self._asked[next(iter(self._asked))]
        if (event := self._running.get(task_id)) is not None:
            event.set()
        self.log.bind(task_id=task_id).info(f"cancel asked: {reason}")

    def asked(self, task_id: str) -> str | None:
        """Why `task_id` was cancelled, if it was."""
        return self._asked.get(task_id)

    def watch(self, task_id: str) -> asyncio.Event:
        """An event set once `task_id` is cancelled (now, if it already is); `done` drops it."""
        event = self._running[task_id] = asyncio.Event()
        if task_id in self._asked:
            event.set()
        return event

    def done(self, task_id: str) -> None:
        self._running.pop(task_id, None)
        self._asked.pop(task_id, None)
