"""The runner's status: the only place it changes.

Each method is one moment of the lifecycle (registered, a task starts, succeeds
or fails, shutdown); `runner/state_machine.py` decides the status and this writes
it (`RunnerStatusUpdated`, before the work it names) and then holds it.
"""

from __future__ import annotations

from exojet.bus.statuses import RunnerStatus, status_name
from exojet.runner import state_machine
from exojet.runner.reports import Reports
from exojet.runner.state_machine import Failure


class Transitions:
    """Holds `status` and moves it, one written transition at a time."""

    def __init__(self, reports: Reports) -> None:
        self.reports = reports
        self.status: RunnerStatus = state_machine.registered()

    async def _move(self, status: RunnerStatus) -> None:
        seq = await self.reports.runner_status(status)
        self.reports.log.bind(seq=seq).info(f"{status_name(self.status)} -> {status_name(status)}")
        self.status = status

    async def registered(self) -> None:
        """A new incarnation's first status (after its `RunnerRegistered`)."""
        status = state_machine.registered()
        seq = await self.reports.runner_status(status)
        self.status = status
        self.reports.log.bind(seq=seq).info(f"registered incarnation {self.reports.incarnation}: {status_name(status)}")

    async def start(self, task_type: str) -> RunnerStatus:
        """Write the task's working status (if it has one); returns the status it started in."""
        before = self.status
        if working := state_machine.working_status(task_type):
            await self._move(working)
        return before

    async def succeeded(self, task_type: str, before: RunnerStatus) -> None:
        await self._move(state_machine.finished_status(task_type, before))

    async def failed(self, failure: Failure) -> None:
        """Write where a failed task leaves the runner (`state_machine.failed` decided it)."""
        await self._move(failure.status)

    async def shutting_down(self) -> None:
        await self._move(state_machine.shutting_down())

    async def shut_down(self) -> None:
        await self._move(state_machine.shut_down())
