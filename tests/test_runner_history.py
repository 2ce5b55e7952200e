"""The runner's dedupe of redelivered tasks: the pure fold over its own subject."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exojet.bus.events import RunnerLost, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, RunnerIdle, TaskStatus
from exojet.runner.task_history import TaskHistory

pytestmark = pytest.mark.timeout(30)


def status(task_id: str, task_status: TaskStatus) -> TaskStatusUpdated:
    return TaskStatusUpdated(
        event_id=f"{task_id}-{task_status}",
        runner_id="r1",
        incarnation=1,
        at=0.0,
        task_id=task_id,
        task_status=task_status,
        task_type="LoadModel",
    )


def lost() -> RunnerLost:
    return RunnerLost(event_id="lost", runner_id="r1", incarnation=1, at=0.0, reason="no heartbeat")


def test_a_terminal_status_means_never_again() -> None:
    history = TaskHistory()
    for event in (status("a", TaskStatus.RUNNING), status("a", TaskStatus.COMPLETE), status("b", TaskStatus.FAILED)):
        history.apply(event)
    assert history.answered("a") and history.answered("b")
    assert not history.answered("c")
    assert history.running == {}


def test_running_without_an_end_is_interrupted_not_answered() -> None:
    history = TaskHistory()
    history.apply(status("a", TaskStatus.RUNNING))
    history.apply(RunnerStatusUpdated(event_id="s", runner_id="r1", incarnation=1, at=0.0, runner_status=RunnerIdle()))
    assert history.running == {"a": "LoadModel"}
    assert not history.answered("a")


def test_a_loss_answers_what_was_running_and_nothing_after() -> None:
    history = TaskHistory()
    history.apply(status("a", TaskStatus.RUNNING))
    history.apply(lost())
    history.apply(status("b", TaskStatus.RUNNING))
    assert history.answered("a")
    assert not history.answered("b") and history.running == {"b": "LoadModel"}


# What runners write: Pending is only ever implied by the task message.
statuses = st.sampled_from([s for s in TaskStatus if s != TaskStatus.PENDING])
events = st.lists(st.one_of(st.tuples(st.sampled_from("abcd"), statuses), st.just(None)), max_size=30)


@given(events)
def test_answered_is_exactly_a_terminal_status_or_running_at_a_loss(log: list[tuple[str, TaskStatus] | None]) -> None:
    history = TaskHistory()
    for entry in log:
        history.apply(lost() if entry is None else status(*entry))
    for task_id in "abcd":
        mine = [(i, e[1]) for i, e in enumerate(log) if e is not None and e[0] == task_id]
        terminal = any(s in TERMINAL_TASK_STATUSES for _, s in mine)
        # Running (its last status before some loss was Running, with no terminal status in between).
        lost_while_running = any(
            entry is None and [s for j, s in mine if j < i][-1:] == [TaskStatus.RUNNING] for i, entry in enumerate(log)
        )
        assert history.answered(task_id) == (terminal or lost_while_running), (task_id, log)
