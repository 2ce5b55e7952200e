"""The deterministic simulation of the control plane (sim/, `python -m exojet.sim`), and the bugs it found.

Thousands of seeds run here, each a whole cluster's life under faults, in a few
seconds of CPU: a failing seed prints its violated invariant, the end of its
trace and the command that replays it. The seeds named below each found a bug
in the real code; they stay as regression tests beside a direct test of the fix.
"""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.events import (
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    Placement,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.nats import client, stream_setup
from exojet.bus.statuses import RunnerConnected, RunnerConnecting, RunnerIdle, TaskStatus
from exojet.bus.tasks import ConnectToGroup, Group, Shard, task_type
from exojet.bus.views import TaskView
from exojet.projections.state import ClusterState
from exojet.runner import registration
from exojet.runner.cancels import Cancels
from exojet.runner.event_writer import EventWriter
from exojet.runner.handling import RunnerCore
from exojet.runner.steps import drive
from exojet.runner.task_history import TaskHistory
from exojet.runner.write_chain import Fenced, WriteChain
from exojet.sim import invariants
from exojet.sim.run import run
from exojet.supervisor.actions import SendTask, WriteEvent
from exojet.supervisor.planner import plan
from tests.planner_cluster import Cluster

# Per default-suite run: seeds 0 .. SEEDS-1 (the CLI runs any other range).
SEEDS = 2000


# A minute of CPU: with the fault matrices (`-m slow`, run by .ci/run), so the README's command stays short.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_thousands_of_seeds_keep_every_invariant() -> None:
    started = time.process_time()
    failed = [result.report() for result in map(run, range(SEEDS)) if not result.ok]
    cpu = time.process_time() - started
    assert not failed, f"{len(failed)} of {SEEDS} seeds failed; the first:\n{failed[0]}"
    print(f"{SEEDS} seeds in {cpu:.1f} s of CPU")


def test_a_seed_replays_exactly() -> None:
    first, second = run(282), run(282)
    assert first.world.trace.lines == second.world.trace.lines
    assert first.world.stream.log == second.world.stream.log
    assert first.steps == second.steps and first.log_length > 20


@pytest.mark.parametrize(
    ("seed", "found"),
    [
        (1, "RunnerInTwoInstances: an instance placed again on a runner of its own failed attempt"),
        (4, "RunnerInTwoInstances: a runner an instance between attempts had let go, placed elsewhere"),
        (14, "an instance Placing forever: a runner held by its failed attempt was never unloaded"),
        (252, "a runner in two instances: placed while a task of a failed attempt was still running on it"),
        (282, "TaskAfterTerminal: a restarted runner answered a task a RunnerLost had already failed"),
        (246, "a task never answered: a loss right after a restart answered what the crash had left running"),
        (18, "a runner died on the fence of a loss declared while it started"),
        (4851, "a twin reported (the restarted runner would exit): a crashed incarnation's write landed late"),
    ],
)
def test_seeds_that_found_bugs_pass(seed: int, found: str) -> None:
    result = run(seed)
    assert result.ok, f"(this seed once found: {found})\n{result.report()}"


def test_the_runner_simulated_is_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rule of the real runner broken (a registration that does not fold what landed on its
    # subject since its history was read): the seed that found that bug fails again.
    register = RunnerCore.register
    monkeypatch.setattr(RunnerCore, "register", lambda core, after_loss=False, fold=False: register(core, after_loss))
    result = run(282)
    assert not result.ok and "TaskAfterTerminal" in result.problems[0]


def test_a_violation_is_reported_with_the_command_that_replays_it() -> None:
    truth = ClusterState()
    truth.tasks["t1"] = TaskView(task_id="t1", task_type="LoadModel", runner_id="r1", status=TaskStatus.RUNNING)
    lagging = ClusterState(seq=0)
    truth.seq = 3
    problems = invariants.at_end(truth, [("s1", lagging)])
    assert problems == [
        "task t1 (LoadModel on r1) is still Running",
        "supervisor s1 folded up to seq 0, the log ends at 3",
    ]
    result = run(0)
    result.problems = problems
    report = result.report()
    assert "FAILED" in report and "replay: python -m exojet.sim --seed 0 --trace" in report


# The fixes, tested directly on the real code ----------------------------------------


def _failed_and_due(c: Cluster, instance_id: str) -> None:
    """The current attempt fails and its backoff runs out (the reconciler's clock, by hand)."""
    attempt = c.state.instances[instance_id].attempt
    failed = InstanceFailed(event_id=f"f{attempt}", instance_id=instance_id, reason="x", attempt=attempt)
    c.publish([WriteEvent(failed)])
    c.publish([WriteEvent(InstanceRetryDue(event_id=f"d{attempt}", instance_id=instance_id, attempt=attempt))])


def _placed(instance_id: str, model_id: str, attempt: int) -> WriteEvent:
    placement = Placement(runner_id="r1", shard=Shard(model_id=model_id), incarnation=1)
    event = InstancePlaced(
        event_id=f"{instance_id}:placed:{attempt}",
        instance_id=instance_id,
        model_id=model_id,
        placements=(placement,),
        attempt=attempt,
    )
    return WriteEvent(event)


@pytest.mark.parametrize("again", ["inst-a", "inst-b"])
def test_a_runner_an_instance_between_attempts_let_go_is_no_second_instance(again: str) -> None:
    # Seed 1 (placed again in its own instance) and seed 4 (in another one).
    c = Cluster()
    c.register("r1")
    c.command(PlaceInstance(command_id="a", model_id="m/a"))
    c.command(PlaceInstance(command_id="b", model_id="m/b"))
    c.publish([_placed("inst-a", "m/a", 1)])
    _failed_and_due(c, "inst-a")
    assert c.state.instances["inst-a"].status == "Placing"
    c.publish([_placed(again, f"m/{again[-1]}", 2 if again == "inst-a" else 1)])
    assert c.state.runner_instances["r1"] == again
    assert [a.kind for a in c.state.anomalies] == []


def test_a_runner_held_by_an_older_attempt_is_unloaded() -> None:
    # Seed 14: a ConnectToGroup of attempt 1 ran after the instance was retried.
    c = Cluster()
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(command_id="g", model_id="m/g", min_runners=2))
    c.publish(plan(c.state, {"m/g": 8}))
    downloads = c.publish(plan(c.state))
    for runner, task in zip(("r1", "r2"), downloads, strict=True):
        c.complete(runner, task)
    connects = c.publish(plan(c.state))
    assert [task_type(t) for t in connects] == ["ConnectToGroup", "ConnectToGroup"]
    _failed_and_due(c, "inst-g")
    stale = next(t for t in connects if isinstance(t, ConnectToGroup) and t.group.rank == 0)
    c.event("r1", TaskStatusUpdated, task_id=stale.task_id, task_status=TaskStatus.RUNNING)
    c.status("r1", RunnerConnecting())
    c.status("r1", RunnerConnected())
    c.event("r1", TaskStatusUpdated, task_id=stale.task_id, task_status=TaskStatus.COMPLETE)
    unloads = [a for a in plan(c.state, {"m/g": 8}) if isinstance(a, SendTask) and task_type(a.task) == "UnloadModel"]
    assert [a.runner_id for a in unloads] == ["r1"]
    c.publish(unloads)
    c.complete("r1", unloads[0].task)
    assert c.state.runners["r1"].status == "RunnerIdle"
    # Held again by another stale task after that unload: unloaded again, under a new id.
    c.status("r1", RunnerConnecting())
    c.status("r1", RunnerConnected())
    again = [a for a in plan(c.state, {"m/g": 8}) if isinstance(a, SendTask) and task_type(a.task) == "UnloadModel"]
    assert [a.runner_id for a in again] == ["r1"] and again[0].task.task_id != unloads[0].task.task_id


def test_a_later_incarnation_lost_answers_nothing_an_earlier_one_left_running() -> None:
    # Seed 246: lost right after registering, before answering what the crash left.
    history = TaskHistory()
    history.record("t1", TaskStatus.RUNNING, "LoadModel")
    history.registered()
    history.lose()
    assert not history.answered("t1") and history.unanswered() == {"t1": "LoadModel"}
    history.record("t2", TaskStatus.RUNNING, "StartWarmup")
    history.lose()
    assert history.answered("t2") and history.unanswered() == {"t1": "LoadModel"}


async def test_registration_folds_a_loss_that_landed_after_the_history_was_read(nc: NATS) -> None:
    # Seed 282: incarnation 1 crashed running t1; its RunnerLost landed between the restart's
    # history read and its registration. The projection failed t1 with that RunnerLost, so the
    # new incarnation must not answer t1 again.
    js = nc.jetstream()
    await stream_setup.ensure_streams(js)
    subject = subjects.runner_events_subject("r1")
    first = RunnerRegistered(event_id="r1:1:1", runner_id="r1", incarnation=1)
    await client.publish(js, subject, first, msg_id=first.event_id, expected_last_subject_seq=0)
    running = TaskStatusUpdated(
        event_id="r1:1:2", runner_id="r1", incarnation=1, task_id="t1", task_status=TaskStatus.RUNNING
    )
    ack = await client.publish(js, subject, running, msg_id=running.event_id)
    core = RunnerCore("r1", registration.registration("r1", "127.0.0.1", "", ("mlx",), ""), time.time, Cancels("r1"))
    io = registration.SubjectIO(nc, core)
    await drive(core.read_history(), io.do)
    history = core.history
    assert history.unanswered() == {"t1": None}
    lost = RunnerLost(event_id="r1:1:lost", runner_id="r1", incarnation=1, reason="silent")
    await client.publish(js, subject, lost, msg_id=lost.event_id, expected_last_subject_seq=ack.seq)
    await drive(core.register(fold=True), io.do)
    assert core.incarnation == 2
    assert history.answered("t1") and history.unanswered() == {}


def test_a_runner_with_a_task_not_yet_answered_is_not_placed() -> None:
    # Seed 252: a ConnectToGroup of a failed attempt was Running (its Connecting status not yet
    # written, so the runner looked Idle) when another instance was placed on the runner.
    c = Cluster()
    c.register("r1", memory_free=9000)
    c.register("r2")
    stale = ConnectToGroup(
        task_id="old.a1.connect.r1", group=Group(group_id="old", world_size=2, rank=0, hosts=("h:1", "h:2"))
    )
    c.put(subjects.task_subject("r1"), stale)
    c.event("r1", TaskStatusUpdated, task_id=stale.task_id, task_status=TaskStatus.RUNNING)
    c.command(PlaceInstance(command_id="a", model_id="m/a"))
    [placed] = plan(c.state)
    assert isinstance(placed, WriteEvent) and isinstance(placed.event, InstancePlaced)
    assert [p.runner_id for p in placed.event.placements] == ["r2"]
    c.event("r1", TaskStatusUpdated, task_id=stale.task_id, task_status=TaskStatus.FAILED)
    [placed] = plan(c.state)
    assert isinstance(placed, WriteEvent) and isinstance(placed.event, InstancePlaced)
    assert [p.runner_id for p in placed.event.placements] == ["r1"]


async def test_a_late_write_of_a_crashed_incarnation_is_no_twin(nc: NATS) -> None:
    # Seed 4851: incarnation 1's last write was still on its way when it crashed; it was stored
    # after the restarted process read the subject, so that registration was fenced out.
    js = nc.jetstream()
    await stream_setup.ensure_streams(js)
    subject = subjects.runner_events_subject("r1")
    first = RunnerRegistered(event_id="r1:1:1", runner_id="r1", incarnation=1)
    ack = await client.publish(js, subject, first, msg_id=first.event_id, expected_last_subject_seq=0)
    late = RunnerStatusUpdated(event_id="r1:1:2", runner_id="r1", incarnation=1, runner_status=RunnerIdle())
    await client.publish(js, subject, late, msg_id=late.event_id, expected_last_subject_seq=ack.seq)
    writer = EventWriter(js, WriteChain("r1", 2, ack.seq, time.time))
    with pytest.raises(Fenced) as fenced:
        await writer.write(lambda eid, inc, at: RunnerRegistered(event_id=eid, runner_id="r1", incarnation=inc, at=at))
    assert fenced.value.late and not fenced.value.lost
