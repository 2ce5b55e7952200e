"""Chats' deadlines on one engine, counted in their share of its time (`deadlines.Shares`).

Each chat's work runs under an asyncio timeout; when a chat joins or leaves the engine, every
other chat's timeout moves to the wall time its budget now runs out at. One chat alone is cut
at its budget in wall time, as any other task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from exojet.runner.deadlines import Shares


class SharedDeadlines:
    """The timeouts of the chats in flight on one engine."""

    def __init__(self) -> None:
        self.shares = Shares()
        # Each chat's timeout, and the virtual time its budget runs out at.
        self.budgets: dict[asyncio.Timeout, float] = {}

    @property
    def sharing(self) -> int:
        return len(self.budgets)

    @asynccontextmanager
    async def budget(self, seconds: float) -> AsyncIterator[asyncio.Timeout]:
        """Run the body under a timeout of `seconds` of its share of the engine's time."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as timer:
            self.shares = self.shares.sharing_now(self.sharing + 1, loop.time())
            self.budgets[timer] = self.shares.virtual + seconds
            self._reschedule()
            try:
                yield timer
            finally:
                del self.budgets[timer]
                self.shares = self.shares.sharing_now(self.sharing, loop.time())
                self._reschedule()

    def _reschedule(self) -> None:
        for timer, ends in self.budgets.items():
            # One that has just fired is on its way out (its `finally` removes it).
            if not timer.expired():
                timer.reschedule(self.shares.wall_when(ends))
