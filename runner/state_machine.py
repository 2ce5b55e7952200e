"""Every status change a runner makes, decided here from the lifecycle in
`bus/lifecycle.py`: which task a status accepts, the status it works in, where
success and failure (of each kind) leave it, registration and shutdown. Pure;
`runner/transitions.py` writes what this decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from exojet.bus.chat_ends import KV_CACHE_FULL, REQUEST_REFUSALS
from exojet.bus.lifecycle import FAILED, LIFECYCLE, REGISTERED
from exojet.bus.statuses import RunnerFailed, RunnerStatus, TaskStatus, runner_status, status_name
from exojet.runner.chunks import ChunksNotStored
from exojet.runner.download import DownloadError
from exojet.runner.engine_errors import EngineCrashed, EngineError


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
    status = working_status("Shutdown")
    assert status is not None, "the lifecycle gives Shutdown a working status"
    return status


def shut_down() -> RunnerStatus:
    """The last status an incarnation writes."""
    return finished_status("Shutdown", shutting_down())


def registered() -> RunnerStatus:
    """Where every new incarnation starts, after a crash or a loss too: holding nothing."""
    return runner_status(REGISTERED)


@dataclass(frozen=True)
class Failure:
    """How a task that raised ends: the runner's next status and the task's error."""

    status: RunnerStatus
    error_type: str
    message: str
    # The engine child must be replaced (and with it any group it had joined).
    engine_lost: bool = False
    # Not an error a person can act on: a bug of ours, worth a traceback in the log.
    internal: bool = False
    # The task's terminal status.
    task_status: TaskStatus = TaskStatus.FAILED


def failed(task_type: str, before: RunnerStatus, err: Exception) -> Failure:
    """Where a task that raised `err` leaves the runner, in words a person can act on."""
    match err:
        case ChunksNotStored():
            # The bus failed the client, not the engine: the runner is as usable as before.
            return Failure(finished_status(task_type, before), "ChunksNotStored", str(err))
        case EngineError(error_type=error_type, message=message) if error_type in REQUEST_REFUSALS | {KV_CACHE_FULL}:
            # The request, or a cache full for a while, not the engine: the runner is as it was.
            return Failure(finished_status(task_type, before), error_type, message)
        case EngineCrashed():
            return Failure(_failure_status(task_type, str(err)), "EngineCrashed", str(err), engine_lost=True)
        case (
            EngineError(error_type=error_type, message=message) | DownloadError(error_type=error_type, message=message)
        ):
            return Failure(_failure_status(task_type, message), error_type, message)
    # A bug of ours must cost one task, not the runner: fail it loudly and start
    # the engine afresh, as after a crash.
    message = f"internal error in {task_type}: {err!r} (see the runner's log)"
    return Failure(_failure_status(task_type, message), "InternalError", message, engine_lost=True, internal=True)


def timed_out(task_type: str, before: RunnerStatus, seconds: float, engine_kept: bool) -> Failure:
    """Where a task cut at its deadline leaves the runner: a chat whose engine stopped in
    time changes nothing; otherwise the task's failure status (its engine already stopped)."""
    message = f"{task_type} passed its deadline of {seconds:.0f} s, counted from when the runner started it"
    if engine_kept:
        return Failure(
            finished_status(task_type, before), "DeadlineExceeded", message, task_status=TaskStatus.TIMED_OUT
        )
    status = _failure_status(task_type, f"{message}; its work was stopped: send the task again")
    return Failure(status, "DeadlineExceeded", message, task_status=TaskStatus.TIMED_OUT)


def _failure_status(task_type: str, message: str) -> RunnerStatus:
    name = LIFECYCLE[task_type].failure
    return RunnerFailed(error_message=message) if name == FAILED else runner_status(name)
