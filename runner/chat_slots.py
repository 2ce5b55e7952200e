"""The chats a runner runs at once (DESIGN.md, "Concurrent chats").

A runner takes a further chat from its queue only while it runs fewer than its capacity
(what the loaded model's engine serves at once; 1 before a load and in a pipeline group).
Its first chat moves it `Ready -> Running`, the last one to end moves it back; a chat that
fails in a way that fails the runner moves it at once. Each chat is an asyncio task of
the task loop's; a fenced write in one is kept here (with the message, to answer again
after the runner rejoined) and wakes the loop, which stops the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger
from nats.aio.msg import Msg

from exojet.bus.statuses import RunnerStatus
from exojet.runner import state_machine
from exojet.runner.event_writer import Fenced
from exojet.runner.state_machine import Failure
from exojet.runner.transitions import Transitions

CHAT = "ChatCompletion"


class ChatSlots:
    """The chats in flight, their count against the capacity, and the runner's Running."""

    def __init__(self, transitions: Transitions, capacity: Callable[[], int]) -> None:
        self.transitions = transitions
        # The loaded model's (it changes with each load).
        self.capacity = capacity
        # Each chat's task and message, by task id.
        self.running: dict[str, tuple[asyncio.Task[Any], Msg]] = {}
        # Set when a chat ended (room for another) or was fenced.
        self.changed = asyncio.Event()
        # The first fenced write of a chat, and the messages of the chats it stopped.
        self.fenced: Fenced | None = None
        self.fence_seen = asyncio.Event()
        self.to_answer_again: list[Msg] = []
        # Chats between `enter` and `leave`, and the status the first of them started in.
        self._in_flight = 0
        self._before: RunnerStatus | None = None
        self._moving = asyncio.Lock()

    @property
    def full(self) -> bool:
        return len(self.running) >= self.capacity()

    def start(self, task_id: str, msg: Msg, work: Coroutine[Any, Any, Any]) -> None:
        """Run one chat's handling beside the others."""
        task = asyncio.ensure_future(work)
        self.running[task_id] = (task, msg)
        self.changed.clear()
        task.add_done_callback(lambda done: self._ended(task_id, msg, done))

    def _ended(self, task_id: str, msg: Msg, done: asyncio.Task[Any]) -> None:
        self.running.pop(task_id, None)
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
        self._in_flight = 0
        return again + [m for m in stopped if m not in again]

    async def enter(self) -> RunnerStatus:
        """A chat starts: the first moves the runner to Running. The status chats started in."""
        async with self._moving:
            self._in_flight += 1
            if self._in_flight == 1 or self._before is None:
                self._before = await self.transitions.start(CHAT)
            return self._before

    async def leave(self, failure: Failure | None) -> None:
        """A chat ended (`failure`: how, if it failed): the last moves the runner back to Ready,
        a failure that fails the runner moves it at once."""
        async with self._moving:
            self._in_flight = max(0, self._in_flight - 1)
            before = self._before or self.transitions.status
            if failure is not None and failure.status != state_machine.finished_status(CHAT, before):
                if failure.status != self.transitions.status:
                    await self.transitions.failed(failure)
            elif self._in_flight == 0 and self.transitions.status == state_machine.working_status(CHAT):
                await self.transitions.succeeded(CHAT, before)

    def status_for(self, task_type: str) -> RunnerStatus:
        """The status a task is checked against: a chat beside others, the one they started in
        (also while the last one's move back is being written: `enter` waits for it)."""
        running = self._in_flight or self.transitions.status == state_machine.working_status(CHAT)
        if task_type == CHAT and running and self._before is not None:
            return self._before
        return self.transitions.status
