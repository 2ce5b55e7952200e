"""The runner's dedupe of redelivered tasks: the pure fold over its own subject."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.events import RunnerLost, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.task_consumer import TaskConsumer
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, RunnerIdle, TaskStatus
from exojet.bus.tasks import StartWarmup
from exojet.runner.cancels import Cancels
from exojet.runner.handling import RunnerCore
from exojet.runner.registration import SubjectIO, registration
from exojet.runner.steps import drive
from exojet.runner.task_history import DONE_WINDOW, TaskHistory

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


def test_the_answered_window_is_bounded_and_keeps_the_newest() -> None:
    history = TaskHistory()
    for i in range(DONE_WINDOW * 2):
        history.record(f"t{i}", TaskStatus.COMPLETE, "ChatCompletion")
    assert len(history.done) <= DONE_WINDOW + DONE_WINDOW // 10
    assert history.answered(f"t{DONE_WINDOW * 2 - 1}") and history.answered(f"t{DONE_WINDOW + 1}")
    assert not history.answered("t0")


async def test_history_is_read_from_the_task_consumers_ack_floor(nats_server: NatsServer, nc: NATS) -> None:
    js = nc.jetstream()
    await stream_setup.ensure_streams(js)
    ev, tk = subjects.runner_events_subject("r1"), subjects.task_subject("r1")
    seqs = {}
    for task_id in ("a", "b", "c"):
        seqs[task_id] = (await client.publish(js, tk, StartWarmup(task_id=task_id))).seq
        await client.publish(js, ev, status(task_id, TaskStatus.RUNNING))
        if task_id != "c":  # c's runner crashed while it ran: never finished, never acknowledged
            await client.publish(js, ev, status(task_id, TaskStatus.COMPLETE))
    consumer = await TaskConsumer(nc, "r1").start()
    for _ in ("a", "b"):
        await (await asyncio.wait_for(consumer.next(), 10)).ack_sync()
    await asyncio.wait_for(consumer.next(), 10)  # c: delivered, not acknowledged

    start, history = await _read_history(nc, "r1")
    # a and b are acknowledged: never delivered again. The read starts after b's task
    # (the floor), so a's statuses are not read; b's came after its task.
    assert start == seqs["b"] + 1
    assert history.running == {"c": "LoadModel"} and list(history.done) == ["b"]
    # No consumer yet (a runner id's first start): the whole subject.
    start, fresh = await _read_history(nc, "r9")
    assert start == 1 and not fresh.done


async def _read_history(nc: NATS, runner_id: str) -> tuple[int, TaskHistory]:
    """`RunnerCore.read_history` driven with NATS, as a runner's start does: the seq it read from, and the history."""
    core = RunnerCore(runner_id, registration(runner_id, "127.0.0.1", "", ("mlx",), ""), time.time, Cancels(runner_id))
    start = await drive(core.read_history(), SubjectIO(nc, core).do)
    return start, core.history
