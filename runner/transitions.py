"""The runner's status: the only place it changes.

Each method is one moment of the lifecycle (registered, a task starts, succeeds
or fails, shutdown); `runner/state_machine.py` decides the status and this writes
it (`RunnerStatusUpdated`, before the work it names) and then holds it.
"""

from __future__ import annotations

from exojet.bus.statuses import RunnerStatus, status_name
from exojet.runner import state_machine
from exojet.runner.reports import Reports, TaskReport
from exojet.runner.state_machine import Failure


class Transitions:
    """Holds `status` and moves it, one written transition at a time."""

    def __init__(self, reports: Reports) -> None:
        self.reports = reports
        self.status: RunnerStatus = state_machine.registered()

    async def _move(
        self, status: RunnerStatus, task_before: TaskReport | None = None, task_after: TaskReport | None = None
    ) -> None:
        seq = await self.reports.runner_status(status, task_before=task_before, task_after=task_after)
        self.reports.log.bind(seq=seq).info(f"{status_name(self.status)} -> {status_name(status)}")
        self.status = status

    async def registered(self) -> None:
        """A new incarnation's first status (after its `RunnerRegistered`)."""
        status = state_machine.registered()
        seq = await self.reports.runner_status(status)
        self.status = status
        self.reports.log.bind(seq=seq).info(f"registered incarnation {self.reports.incarnation}: {status_name(status)}")

    async def start(self, task_type: str, running: TaskReport) -> RunnerStatus:
        """Write the task's `running` status and then its working status (if it has one),
        in one round trip; returns the status it started in."""
        before = self.status
        if working := state_machine.working_status(task_type):
            await self._move(working, task_before=running)
        else:
            await self.reports.task_status(running.task_id, running.status, running.kind)
        return before

    async def succeeded(self, task_type: str, before: RunnerStatus, outcome: TaskReport) -> None:
        """Write where the task leaves the runner, then the task's terminal `outcome`."""
        await self._move(state_machine.finished_status(task_type, before), task_after=outcome)

    async def failed(self, failure: Failure, outcome: TaskReport) -> None:
        """Write where a failed task leaves the runner (`state_machine.failed` decided it),
        then the task's terminal `outcome`."""
        await self._move(failure.status, task_after=outcome)

    async def shutting_down(self) -> None:
        await self._move(state_machine.shutting_down())

    async def shut_down(self) -> None:
        await self._move(state_machine.shut_down())
