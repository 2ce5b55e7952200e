"""The chats a runner runs at once (DESIGN.md, "Concurrent chats").

A runner takes a further chat from its queue only while it runs fewer than its capacity
(what the loaded model's engine serves at once; 1 before a load and in a pipeline group).
Each chat's handling (`RunnerCore.handle`, whose status moves `runner/transitions.py`
counts) is an asyncio task of the task loop's; a fenced write in one is kept here (with
the message, to answer again after the runner rejoined) and wakes the loop, which stops
the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger
from nats.aio.msg import Msg

from exojet.runner.transitions import Transitions
from exojet.runner.write_chain import Fenced


class ChatSlots:
    """The chats in flight, as asyncio tasks, against the capacity."""

    def __init__(self, transitions: Transitions, capacity: Callable[[], int]) -> None:
        self.transitions = transitions
        # The loaded model's (it changes with each load).
        self.capacity = capacity
        # Each chat's task and message, by task id.
        self.running: dict[str, tuple[asyncio.Task[Any], Msg]] = {}
        # The slots each takes: its `n` answers, one sequence each.
        self.sequences: dict[str, int] = {}
        # Set when a chat ended (room for another) or was fenced.
        self.changed = asyncio.Event()
        # The first fenced write of a chat, and the messages of the chats it stopped.
        self.fenced: Fenced | None = None
        self.fence_seen = asyncio.Event()
        self.to_answer_again: list[Msg] = []

    @property
    def full(self) -> bool:
        return sum(self.sequences.values()) >= self.capacity()

    def fits(self, n: int) -> bool:
        """Whether a chat of `n` answers may start now: n slots are free, or none is taken (one
        asking more than the capacity is then refused by its engine, rather than waiting for ever)."""
        taken = sum(self.sequences.values())
        return taken == 0 or taken + n <= self.capacity()

    def start(self, task_id: str, msg: Msg, work: Coroutine[Any, Any, Any], n: int = 1) -> None:
        """Run one chat's handling (of `n` answers) beside the others."""
        task = asyncio.ensure_future(work)
        self.running[task_id] = (task, msg)
        self.sequences[task_id] = n
        self.changed.clear()
        task.add_done_callback(lambda done: self._ended(task_id, msg, done))

    def _ended(self, task_id: str, msg: Msg, done: asyncio.Task[Any]) -> None:
        self.running.pop(task_id, None)
        self.sequences.pop(task_id, None)
        if not done.cancelled() and (err := done.exception()) is not None:
            if isinstance(err, Fenced):
                self.fenced = self.fenced or err
                self.fence_seen.set()
                self.to_answer_again.append(msg)
            else:
                logger.opt(exception=err).error(f"chat {task_id} ended with an error the task loop did not answer")
        self.changed.set()

    async def wait(self) -> None:
        """Until a chat ends or is fenced."""
        await self.changed.wait()
        self.changed.clear()

    async def stop_all(self) -> list[Msg]:
        """Cancel every chat (a loss or a stop ends them): the messages of those it stopped."""
        stopped = [msg for _, msg in self.running.values()]
        tasks = [task for task, _ in self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        again, self.to_answer_again = self.to_answer_again, []
        self.fenced = None
        self.fence_seen.clear()
        self.transitions.stop_chats()
        return again + [m for m in stopped if m not in again]
