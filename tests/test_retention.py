"""Retention: pruning finished work never changes what a query answers about live work."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exojet.bus.codec import encode
from exojet.bus.commands import DeleteInstance, PlaceInstance, RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    Placement,
    RunnerStatusUpdated,
)
from exojet.bus.replies import Page
from exojet.bus.statuses import RunnerReady, TaskStatus
from exojet.bus.tasks import ChatCompletion, DownloadModel, LoadModel, StartWarmup
from exojet.bus.views import Retention
from exojet.projections import instances
from exojet.projections.apply import apply
from exojet.projections.queries import (
    Filters,
    Paging,
    QueryError,
    instance_reply,
    runner_reply,
    state_reply,
    task_reply,
)
from exojet.projections.snapshot import dump_snapshot, load_snapshot
from exojet.projections.state import ClusterState, state_hash
from exojet.supervisor.planner import plan
from tests.sample_logs import HI, SHARD, Flow, direct_chat, registered, task_status

pytestmark = pytest.mark.timeout(300)

KEEP_ALL = Retention(finished=10**9, age_s=math.inf, anomalies=10**9)


def _instance(j: int, ending: str) -> Flow:
    """An instance on its own runner: placed, driven to Ready, a routed chat, then `ending`."""
    runner, inst, cmd = f"ri{j}", f"inst-p{j}", f"p{j}"
    tk, ev, sup = f"exo.tasks.{runner}", f"exo.events.runner.{runner}", "exo.events.supervisor"
    steps = [
        (DownloadModel, f"{inst}.a1.download.{runner}"),
        (LoadModel, f"{inst}.a1.load.{runner}"),
        (StartWarmup, f"{inst}.a1.warmup.{runner}"),
    ]
    flow: Flow = [
        *registered(runner),
        ("exo.commands", PlaceInstance(command_id=cmd, model_id="local/tiny", runners=(runner,))),
        (
            sup,
            InstancePlaced(
                event_id=f"placed{j}",
                instance_id=inst,
                model_id="local/tiny",
                placements=(Placement(runner_id=runner, shard=SHARD, incarnation=1),),
                attempt=1,
            ),
        ),
    ]
    for kind, task_id in steps:
        task = (
            kind(task_id=task_id, instance_id=inst, shard=SHARD)
            if kind is not StartWarmup
            else kind(task_id=task_id, instance_id=inst)
        )
        flow += [(tk, task), (ev, task_status(runner, "s", task_id, TaskStatus.COMPLETE))]
    flow += [
        (
            ev,
            RunnerStatusUpdated(
                event_id=f"{runner}:ready", runner_id=runner, incarnation=1, runner_status=RunnerReady()
            ),
        ),
        ("exo.commands", RouteChatCompletion(command_id=f"c{j}", messages=HI)),
        (tk, ChatCompletion(task_id=f"chat-c{j}.0", instance_id=inst, messages=HI, stream_id=f"chat-c{j}")),
        (ev, task_status(runner, "c", f"chat-c{j}.0", TaskStatus.COMPLETE)),
    ]
    if ending == "delete":
        flow.append(("exo.commands", DeleteInstance(instance_id=inst)))
    elif ending == "fail":
        flow += [
            (sup, InstanceFailed(event_id=f"failed{j}", instance_id=inst, reason="lost", attempt=1)),
            (sup, InstanceRetryDue(event_id=f"retry{j}", instance_id=inst, attempt=1)),
        ]
    return flow


@st.composite
def logs(draw: st.DrawFn) -> list[Envelope]:
    """Several runners' direct chats and instances' lives, interleaved, each cut at a random
    point (so some work is live at the end), with log times that move on at random."""
    flows: list[Flow] = [registered("r1"), registered("r2")]
    for k in range(draw(st.integers(0, 30))):
        runner = draw(st.sampled_from(["r1", "r2"]))
        terminal = draw(st.sampled_from([TaskStatus.COMPLETE, TaskStatus.FAILED]))
        flow = direct_chat(runner, k, terminal)
        flows.append(flow[: draw(st.integers(1, len(flow)))])
    for j in range(draw(st.integers(0, 4))):
        flow = _instance(j, draw(st.sampled_from(["delete", "fail", "live"])))
        flows.append(flow[: draw(st.integers(1, len(flow)))])
    # Registration first; then which flow moves next is drawn (each keeps its own order).
    order = [0] * len(flows[0]) + [1] * len(flows[1])
    rest = [i for i, flow in enumerate(flows) if i > 1 for _ in flow]
    order += draw(st.permutations(rest))
    positions = [0] * len(flows)
    envs: list[Envelope] = []
    time = 1_000.0
    for i in order:
        subject, message = flows[i][positions[i]]
        positions[i] += 1
        time += draw(st.sampled_from([0.0, 0.5, 5.0, 60.0]))
        data = message if isinstance(message, bytes) else encode(message)
        envs.append(Envelope(seq=len(envs) + 1, subject=subject, data=data, time=time))
    return envs


def _fold(envs: list[Envelope], retention: Retention) -> ClusterState:
    state = ClusterState(retention=retention)
    for env in envs:
        state = apply(state, env)
    return state


def _live_answers(state: ClusterState) -> dict[str, object]:
    """Everything a query says about live work: runners, unfinished tasks, live instances, chats waiting."""
    reply = msgspec.to_builtins(state_reply(state))
    unfinished = sorted(t.task_id for t in state.tasks.values() if t.status not in ("Complete", "Failed"))
    live_instances = sorted(i for i, v in state.instances.items() if v.status not in ("Deleted", "Failed"))
    return {
        "seq": state.seq,
        "runners": reply["runners"],
        "load": reply["load"],
        "unfinished": reply["unfinished_tasks"],
        "runner_replies": [msgspec.to_builtins(runner_reply(state, r).runner) for r in sorted(state.runners)],
        "tasks": [msgspec.to_builtins(task_reply(state, t)) for t in unfinished],
        "instances": [msgspec.to_builtins(instance_reply(state, i)) for i in live_instances],
        "pending_chats": reply["pending_chats"],
        "anomaly_count": state.anomaly_count,
        "plan": msgspec.to_builtins(plan(state)),
    }


@settings(max_examples=150, deadline=None)
@given(
    envs=logs(),
    finished=st.integers(0, 5),
    age=st.sampled_from([0.0, 1.0, 30.0, 600.0]),
    cut=st.integers(0, 400),
)
def test_pruning_never_changes_answers_about_live_work(
    envs: list[Envelope], finished: int, age: float, cut: int
) -> None:
    small = Retention(finished=finished, age_s=age, anomalies=2)
    pruned = _fold(envs, small)
    kept = _fold(envs, KEEP_ALL)
    assert _live_answers(pruned) == _live_answers(kept)
    # The index of unfinished tasks is what a scan finds.
    assert set(pruned.unfinished) == {
        t.task_id for t in pruned.tasks.values() if t.status not in ("Complete", "Failed")
    }
    # Bounded: what is left of finished work is at most the window plus one batch,
    # besides the step tasks that live instances hold.
    finished_tasks = [t for t in pruned.tasks.values() if t.status in ("Complete", "Failed")]
    held = sum(1 for t in finished_tasks if instances.holds(pruned, t))
    assert len(finished_tasks) <= 2 * held + finished + max(finished // 10, 1)
    assert len(pruned.anomalies) <= 3
    # Pruning is part of the fold: a snapshot cut anywhere gives the same state.
    cut = min(cut, len(envs))
    restored = load_snapshot(dump_snapshot(_fold(envs[:cut], small)))
    for env in envs[cut:]:
        restored = apply(restored, env)
    assert state_hash(restored) == state_hash(pruned)


def test_finished_work_leaves_by_count_and_by_log_age() -> None:
    flows = registered("r1") + [p for k in range(30) for p in direct_chat("r1", k, TaskStatus.COMPLETE)]
    envs = [
        Envelope(seq=i + 1, subject=s, data=encode(m), time=100.0 + i)  # type: ignore[arg-type]
        for i, (s, m) in enumerate(flows)
    ]
    by_count = _fold(envs, Retention(finished=10, age_s=math.inf))
    # Never more than the window and a batch (a tenth of it); the newest stay.
    assert 10 <= len(by_count.tasks) <= 11
    assert "tr129" in by_count.tasks and "tr10" not in by_count.tasks
    assert by_count.pruned == 30 - len(by_count.tasks)
    with pytest.raises(QueryError) as err:
        task_reply(by_count, "tr10")
    assert err.value.code == "NotFound"
    assert "exojet replay --task tr10" in err.value.message
    # 3 messages a task, 1 s apart, the last at 191: a 20 s window (plus the tenth of it a
    # batch may wait) keeps the tasks finished since 171 (k >= 23), perhaps since 169 (k >= 22).
    by_age = _fold(envs, Retention(finished=10**6, age_s=20.0))
    assert {f"tr1{k}" for k in range(23, 30)} <= set(by_age.tasks) <= {f"tr1{k}" for k in range(22, 30)}
    # A task never published, looked up in a state that pruned nothing, is simply unknown.
    with pytest.raises(QueryError) as err:
        task_reply(_fold(envs[:5], KEEP_ALL), "nope")
    assert "replay" not in err.value.message


def test_replies_are_pages_whatever_the_history() -> None:
    flows = registered("r1") + [p for k in range(3000) for p in direct_chat("r1", k, TaskStatus.COMPLETE)]
    envs = [
        Envelope(seq=i + 1, subject=s, data=encode(m))  # type: ignore[arg-type]
        for i, (s, m) in enumerate(flows)
    ]
    state = _fold(envs, KEEP_ALL)
    reply = state_reply(state)
    assert len(msgspec.json.encode(reply)) < 100_000
    assert reply.tasks_page == Page(total=3000, offset=0, limit=100, next_offset=100)
    assert next(iter(reply.tasks)) == "tr12999"  # newest first
    assert set(reply.runners) == {"r1"} and reply.runners_page.next_offset is None
    last = state_reply(state, Paging(offset=2950, limit=100), Filters(sections=("tasks",)))
    assert len(last.tasks) == 50 and last.tasks_page.next_offset is None
    assert last.runners == {} and last.runners_page.total == 1
    assert len(msgspec.json.encode(state_reply(state, Paging(limit=10**6)))) < 1_000_000  # capped at 500
    one = runner_reply(state, "r1", Paging(limit=5))
    assert [t.task_id for t in one.tasks] == [f"tr1{k}" for k in range(2999, 2994, -1)]
    assert one.tasks_page.total == 3000
    assert b"state_hash" not in msgspec.json.encode(reply)
    assert state_reply(state, with_hash=True).state_hash == state_hash(state)
