"""runner/state_machine.py against DESIGN.md's table, for every task and every runner status."""

from __future__ import annotations

import msgspec
import pytest

from exojet.bus import statuses
from exojet.bus.statuses import RunnerFailed, RunnerIdle, RunnerReady, RunnerStatus, status_name
from exojet.runner import state_machine
from exojet.runner.chunks import ChunksNotStored
from exojet.runner.download import DownloadError
from exojet.runner.engine_errors import EngineCrashed, EngineError
from tests.runner_harness import ACCEPTED

pytestmark = pytest.mark.timeout(10)

ALL_STATUSES: list[RunnerStatus] = [
    cls(error_message="boom") if cls is RunnerFailed else cls()
    for cls in vars(statuses).values()
    if isinstance(cls, type)
    and issubclass(cls, msgspec.Struct)
    and cls.__name__.startswith("Runner")
    and cls.__name__ != "RunnerStatus"
]


def test_every_status_is_checked() -> None:
    assert len(ALL_STATUSES) == 13


@pytest.mark.parametrize("task_type", sorted(ACCEPTED))
def test_accepts_exactly_designs_table(task_type: str) -> None:
    for status in ALL_STATUSES:
        assert state_machine.accepts(task_type, status) == (status_name(status) in ACCEPTED[task_type]), (
            task_type,
            status_name(status),
        )


def test_shutdown_is_accepted_in_every_status() -> None:
    assert all(state_machine.accepts("Shutdown", status) for status in ALL_STATUSES)


def test_refusal_names_the_needed_and_the_current_status() -> None:
    message = state_machine.invalid_state_message("ChatCompletion", RunnerIdle())
    assert message == "ChatCompletion needs RunnerReady, runner is RunnerIdle"


def test_download_returns_where_it_was_and_idle_after_failed() -> None:
    for before in ("RunnerIdle", "RunnerConnected"):
        status = next(s for s in ALL_STATUSES if status_name(s) == before)
        assert status_name(state_machine.finished_status("DownloadModel", status)) == before
    assert status_name(state_machine.finished_status("DownloadModel", RunnerFailed(error_message="x"))) == "RunnerIdle"


def test_engine_and_download_errors_leave_the_runner_failed_with_their_words() -> None:
    for err, error_type in (
        (EngineError("ModelLoadFailed", "weights are garbage"), "ModelLoadFailed"),
        (DownloadError("ModelNotFound", "no such repo"), "ModelNotFound"),
    ):
        failure = state_machine.failed("LoadModel", RunnerIdle(), err)
        assert failure.status == RunnerFailed(error_message=failure.message) and failure.error_type == error_type
        assert failure.message in ("weights are garbage", "no such repo")
        assert not failure.engine_lost and not failure.internal


def test_a_crashed_engine_is_replaced() -> None:
    failure = state_machine.failed("ChatCompletion", RunnerReady(), EngineCrashed("engine exited with -9"))
    assert failure.status == RunnerFailed(error_message="engine exited with -9")
    assert failure.error_type == "EngineCrashed" and failure.engine_lost


def test_unstored_chunks_leave_the_runner_as_usable_as_before() -> None:
    failure = state_machine.failed("ChatCompletion", RunnerReady(), ChunksNotStored("3 chunks not acked"))
    assert failure.status == RunnerReady() and failure.error_type == "ChunksNotStored" and not failure.engine_lost


def test_a_bug_of_ours_fails_the_task_and_replaces_the_engine() -> None:
    failure = state_machine.failed("StartWarmup", RunnerIdle(), KeyError("x"))
    assert failure.error_type == "InternalError" and failure.engine_lost and failure.internal
    assert isinstance(failure.status, RunnerFailed) and "KeyError" in failure.status.error_message


def test_registration_and_shutdown_statuses() -> None:
    assert status_name(state_machine.registered()) == "RunnerIdle"
    assert status_name(state_machine.shutting_down()) == "RunnerShuttingDown"
    assert status_name(state_machine.shut_down()) == "RunnerShutdown"
