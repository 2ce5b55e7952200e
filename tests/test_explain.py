"""`explain` over hand-written logs: the chain of messages and the one line that names the cause;
and every message of a log in words (what `exojet replay` prints)."""

from __future__ import annotations

import msgspec
import pytest

from exojet.bus.commands import DeleteInstance, RouteChatCompletion
from exojet.bus.events import (
    ChatRefused,
    InstanceFailed,
    RunnerLost,
    TaskStatusUpdated,
)
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.projections.apply import apply
from exojet.projections.explain import UnknownId, explain
from exojet.projections.state import ClusterState
from exojet.projections.words import describe, message_of
from tests.sample_logs import INST, RUNNER, SUP, placed_until_loading, ready_log


def test_runner_stuck_mid_transition_names_its_last_event_and_task() -> None:
    found = explain(placed_until_loading().envs, "r1")
    assert found.target == "runner" and found.status == "RunnerLoading"
    assert [s.status for s in found.steps] == ["Unregistered", "RunnerIdle", "RunnerLoading"]
    assert found.cause == (
        f"r1 is stuck in RunnerLoading since seq 10 while task {INST}.a1.load.r1 (LoadModel) runs: "
        "its last event is seq 10, none has ended the transition"
    )


def test_instance_waiting_on_a_task_whose_failure_event_was_refused() -> None:
    log = placed_until_loading()
    # The runner reports the load failed, in a shape the contract does not accept (exo #2219).
    log.add(RUNNER, b'{"type":"RunnerStatusUpdated","event_id":"x","runner_id":"r1","runner_status":{"type":"Oops"}}')
    inst = explain(log.envs, INST)
    assert inst.target == "instance" and inst.status == "Loading"
    assert [s.status for s in inst.steps] == ["Placing", "Downloading", "Loading"]
    assert inst.cause.startswith(f"{INST} (local/tiny) is Loading, waiting on task {INST}.a1.load.r1 (LoadModel on r1)")
    runner = explain(log.envs, "r1")
    assert "refused by the fold: BadEvent" in runner.steps[-1].words
    assert runner.cause.endswith("; the message at seq 11 that would have changed it was refused")


def test_ready_instance_behind_a_lost_runner() -> None:
    log = ready_log()
    log.add(RUNNER, RunnerLost(event_id=log.eid(), runner_id="r1", incarnation=1, reason="no heartbeat for 5 s"))
    found = explain(log.envs, INST)
    assert found.status == "Ready"
    assert found.cause == (
        f"{INST} (local/tiny) is Ready in the log but its runner r1 is RunnerLost (incarnation 1) "
        "since seq 17: it cannot serve"
    )
    assert (
        explain(log.envs, "r1").cause == f"r1 was declared lost since seq 17: no heartbeat for 5 s (it was in {INST})"
    )


def test_failed_task_and_failed_instance_name_their_error() -> None:
    log = placed_until_loading()
    log.task(
        f"{INST}.a1.load.r1", TaskStatus.FAILED, error_type="OutOfMemory", error_message="needs 9 GB\n  stderr: oom"
    )
    log.add(
        SUP,
        InstanceFailed(event_id=log.eid(), instance_id=INST, reason="load failed: needs 9 GB", attempt=1, final=True),
    )
    task = explain(log.envs, f"{INST}.a1.load.r1")
    assert [s.status for s in task.steps] == ["Pending", "Running", "Failed"]
    assert task.cause.endswith("is Failed since seq 11: OutOfMemory: needs 9 GB stderr: oom")  # one line
    assert "\n" not in task.steps[-1].words
    assert (
        explain(log.envs, INST).cause == f"{INST} (local/tiny) is Failed for good since seq 12: load failed: needs 9 GB"
    )


def test_ready_runner_and_unknown_id() -> None:
    log = ready_log()
    assert explain(log.envs, INST).cause == f"{INST} (local/tiny) is Ready since seq 15 on r1"
    assert explain(log.envs, "r1").cause == "r1 is RunnerReady since seq 16 with local/tiny"
    with pytest.raises(UnknownId, match="nope"):
        explain(log.envs, "nope")


def test_every_message_in_words() -> None:
    log = ready_log()
    log.add("exo.commands", RouteChatCompletion(command_id="c1", messages=(ChatMessage("user", "hi there"),)))
    log.add(SUP, ChatRefused(event_id=log.eid(), chat_id="chat-c1", error_type="QueueFull", reason="64 in flight"))
    log.add("exo.cancel.r1", b'{"type":"CancelTask","task_id":"t9","reason":"client disconnected"}')
    log.add("exo.commands", DeleteInstance(instance_id=INST))
    log.add("exo.commands", b'{"type":"Nope"}')
    state = ClusterState()
    lines: list[tuple[str, str]] = []
    for env in log.envs:
        lines.append(describe(state, env, message_of(env)))
        state = apply(state, env)
    words = dict(zip([e.seq for e in log.envs], lines, strict=True))
    assert words[3] == ("PlaceInstance", f"place {INST}: local/tiny on r1")
    assert words[4] == ("InstancePlaced", f"{INST} attempt 1 placed on r1")
    assert words[5] == ("DownloadModel", f"task {INST}.a1.download.r1: DownloadModel local/tiny")
    assert words[17] == ("RouteChatCompletion", "chat chat-c1 for any model: 'hi there'")
    assert words[18] == ("ChatRefused", "chat chat-c1 refused (QueueFull): 64 in flight")
    assert words[19] == ("CancelTask", "cancel task t9 (was unknown): client disconnected")
    assert words[20] == ("DeleteInstance", f"delete {INST} (was Ready)")
    assert words[21][0] == "Invalid" and "Nope" in words[21][1]
    assert all(text for _, text in lines)


def test_a_chat_says_where_its_time_went() -> None:
    log = ready_log()
    log.add("exo.commands", RouteChatCompletion(command_id="c1", messages=(ChatMessage("user", "hi there"),)))
    task = ChatCompletion(task_id="chat-c1.0", instance_id=INST, messages=(ChatMessage("user", "hi there"),))
    log.add("exo.tasks.r1", msgspec.structs.replace(task, stream_id="chat-c1"))  # 1 s after it was asked
    log.add("exo.commands", DeleteInstance(instance_id="inst-elsewhere"))  # the chat waits in r1's queue
    log.task("chat-c1.0", TaskStatus.RUNNING)  # 2 s after it was routed
    result = {
        "text": "hello",
        "prompt_tokens": 12,
        "completion_tokens": 40,
        "tokens_per_second": 20.0,
        "engine_seconds": 2.25,
        "time_to_first_token": 0.25,
    }
    log.add(
        RUNNER,
        TaskStatusUpdated(
            event_id=log.eid(),
            runner_id="r1",
            incarnation=1,
            task_id="chat-c1.0",
            task_status=TaskStatus.COMPLETE,
            result=result,
        ),
    )
    found = explain(log.envs, "chat-c1")
    assert found.target == "chat" and found.status == "Complete"
    assert found.cause.endswith(
        "; its time: 1.00 s to be routed, 2.00 s in its runner's queue, prefill 0.25 s (12 prompt tokens), "
        "decode 2.00 s (40 tokens, 20.0 tokens/s)"
    )
