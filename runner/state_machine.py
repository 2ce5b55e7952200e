"""The runner's side of the lifecycle in `bus/lifecycle.py`: which task a status
accepts, the status it works in, and where it ends up. Pure; the runner and the
tests read it.
"""

from __future__ import annotations

from exojet.bus.lifecycle import LIFECYCLE
from exojet.bus.statuses import RunnerStatus, runner_status, status_name

SHUTDOWN = LIFECYCLE["Shutdown"]


def accepts(task_type: str, status: RunnerStatus) -> bool:
    """True if a runner in `status` may run a task of `task_type`."""
    row = LIFECYCLE.get(task_type)
    return row is not None and row.accepts(status_name(status))


def invalid_state_message(task_type: str, status: RunnerStatus) -> str:
    """Why a task is refused, naming the status it needs."""
    row = LIFECYCLE.get(task_type)
    needed = " or ".join(row.accepting_statuses()) if row else "a runner that knows it"
    return f"{task_type} needs {needed}, runner is {status_name(status)}"


def working_status(task_type: str) -> RunnerStatus | None:
    """The status a runner reports while it works on the task (None: no transient status)."""
    working = LIFECYCLE[task_type].working
    return runner_status(working) if working else None


def finished_status(task_type: str, before: RunnerStatus) -> RunnerStatus:
    """Where a runner ends up after the task succeeds, given the status it started in."""
    end = LIFECYCLE[task_type].succeeded(status_name(before))
    return before if end == status_name(before) else runner_status(end)


def shutting_down() -> RunnerStatus:
    """What a runner writes first when it stops, on a Shutdown task or a signal."""
    return runner_status(SHUTDOWN.working or "")


def shut_down() -> RunnerStatus:
    """The last status an incarnation writes."""
    return finished_status(SHUTDOWN.task, shutting_down())
