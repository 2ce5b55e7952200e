"""DESIGN.md's runner state machine as data: which status accepts which task,
the status it works in, and where it ends up. Pure; the runner and the tests read it.
"""

from __future__ import annotations

from exojet.bus.statuses import (
    RunnerConnected,
    RunnerConnecting,
    RunnerDownloading,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
    RunnerWarmingUp,
    status_name,
)

IDLE, CONNECTED, LOADED, READY, FAILED = "RunnerIdle", "RunnerConnected", "RunnerLoaded", "RunnerReady", "RunnerFailed"

ACCEPTED_IN: dict[str, tuple[str, ...]] = {
    "DownloadModel": (IDLE, CONNECTED, FAILED),
    "ConnectToGroup": (IDLE, FAILED),
    "LoadModel": (IDLE, CONNECTED),
    "StartWarmup": (LOADED,),
    "ChatCompletion": (READY,),
    "UnloadModel": (CONNECTED, LOADED, READY, FAILED),
}

WORKING: dict[str, RunnerStatus] = {
    "DownloadModel": RunnerDownloading(),
    "ConnectToGroup": RunnerConnecting(),
    "LoadModel": RunnerLoading(),
    "StartWarmup": RunnerWarmingUp(),
    "ChatCompletion": RunnerRunning(),
    "Shutdown": RunnerShuttingDown(),
}


def accepts(task_type: str, status: RunnerStatus) -> bool:
    """True if a runner in `status` may run a task of `task_type` (Shutdown: always)."""
    return task_type == "Shutdown" or status_name(status) in ACCEPTED_IN.get(task_type, ())


def invalid_state_message(task_type: str, status: RunnerStatus) -> str:
    """Why a task is refused, naming the status it needs."""
    needed = " or ".join(ACCEPTED_IN.get(task_type, ()))
    return f"{task_type} needs {needed}, runner is {status_name(status)}"


def working_status(task_type: str) -> RunnerStatus | None:
    """The status a runner reports while it works on the task (None: no transient status)."""
    return WORKING.get(task_type)


def finished_status(task_type: str, before: RunnerStatus) -> RunnerStatus:
    """Where a runner ends up after the task succeeds, given the status it started in."""
    match task_type:
        case "DownloadModel":
            # Back where it was; a Failed runner that fetched its model is usable again.
            return RunnerIdle() if isinstance(before, RunnerFailed) else before
        case "ConnectToGroup":
            return RunnerConnected()
        case "LoadModel":
            return RunnerLoaded()
        case "StartWarmup" | "ChatCompletion":
            return RunnerReady()
        case "UnloadModel":
            return RunnerIdle()
        case "Shutdown":
            return RunnerShutdown()
    raise ValueError(f"unknown task type {task_type}")
