"""The projection: a pure fold, equal after any snapshot cut, deaf to duplicates."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exojet.api.page import render_page
from exojet.bus.codec import encode
from exojet.bus.commands import DeleteInstance, PlaceInstance, RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    DownloadProgress,
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    LoadProgress,
    Placement,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.statuses import (
    RunnerDownloading,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerWarmingUp,
    TaskStatus,
)
from exojet.bus.tasks import ChatCompletion, ChatMessage, DownloadModel, LoadModel, Shard, StartWarmup
from exojet.cli.render import render_state
from exojet.projections.apply import apply, copy_state
from exojet.projections.checks import check
from exojet.projections.queries import Paging, state_reply
from exojet.projections.snapshot import dump_snapshot, load_snapshot
from exojet.projections.state import ClusterState, state_hash

pytestmark = pytest.mark.timeout(120)


# What the page's snapshot adds to the state reply (api/live.py LiveCluster.snapshot), empty.
PAGE_EXTRAS = {"heartbeats": {}, "marks": [], "task_times": {}, "load": [], "bucket_s": 5}


def _fold(envs: list[Envelope], state: ClusterState | None = None) -> ClusterState:
    state = state if state is not None else ClusterState()
    for env in envs:
        state = apply(state, env)
    return state


def _env(seq: int, subject: str, message: msgspec.Struct | bytes) -> Envelope:
    return Envelope(seq=seq, subject=subject, data=message if isinstance(message, bytes) else encode(message))


def _workflow(runner: str = "r1") -> list[tuple[str, msgspec.Struct | bytes]]:
    ev = f"exo.events.runner.{runner}"
    tk = f"exo.tasks.{runner}"
    n = iter(range(1_000_000))

    def eid() -> str:
        return f"{runner}:1:{next(n)}"

    def status(s: msgspec.Struct) -> RunnerStatusUpdated:
        return RunnerStatusUpdated(event_id=eid(), runner_id=runner, incarnation=1, runner_status=s)

    def task(tid: str, st_: TaskStatus, **kw: object) -> TaskStatusUpdated:
        return TaskStatusUpdated(event_id=eid(), runner_id=runner, incarnation=1, task_id=tid, task_status=st_, **kw)

    shard = Shard(model_id="local/tiny")
    return [
        (ev, RunnerRegistered(event_id=eid(), runner_id=runner, incarnation=1, host="h", pid=1)),
        (ev, status(RunnerIdle())),
        (tk, DownloadModel(task_id="d", shard=shard)),
        (ev, task("d", TaskStatus.RUNNING)),
        (ev, status(RunnerDownloading())),
        (
            ev,
            DownloadProgress(
                event_id=eid(),
                runner_id=runner,
                incarnation=1,
                model_id="local/tiny",
                downloaded_bytes=5,
                total_bytes=10,
                completed_files=1,
                total_files=2,
            ),
        ),
        (ev, status(RunnerIdle())),
        (ev, task("d", TaskStatus.COMPLETE)),
        (tk, LoadModel(task_id="l", shard=shard)),
        (ev, task("l", TaskStatus.RUNNING)),
        (ev, status(RunnerLoading())),
        (
            ev,
            LoadProgress(
                event_id=eid(),
                runner_id=runner,
                incarnation=1,
                model_id="local/tiny",
                task_id="l",
                layers_loaded=3,
                layers_total=4,
            ),
        ),
        (ev, status(RunnerLoaded())),
        (ev, task("l", TaskStatus.COMPLETE)),
        (tk, StartWarmup(task_id="w")),
        (ev, task("w", TaskStatus.RUNNING)),
        (ev, status(RunnerWarmingUp())),
        (ev, status(RunnerReady())),
        (ev, task("w", TaskStatus.COMPLETE)),
        (tk, ChatCompletion(task_id="c", messages=(ChatMessage("user", "hi"),))),
        (ev, task("c", TaskStatus.RUNNING)),
        (ev, status(RunnerRunning())),
        (ev, status(RunnerReady())),
        (ev, task("c", TaskStatus.COMPLETE, result={"text": "x" * 500, "finish_reason": "length"})),
        (tk, b"this is not json"),
        (ev, task("25", TaskStatus.FAILED, error_type="NotJson", error_message="task is not valid JSON")),
        (ev, status(RunnerLoading())),  # Ready -> Loading is not allowed
        (ev, status(RunnerFailed(error_message="engine process was killed by SIGKILL"))),
        (ev, RunnerLost(event_id=eid(), runner_id=runner, incarnation=1, reason="no heartbeat for 5 s")),
    ]


def _log(runners: tuple[str, ...] = ("r1", "r2")) -> list[Envelope]:
    pairs = [p for r in runners for p in _workflow(r)]
    return [_env(i + 1, s, m) for i, (s, m) in enumerate(pairs)]


def _instance_workflow() -> list[tuple[str, msgspec.Struct | bytes]]:
    """Commands, supervisor events and instance tasks on r1 (registered by `_workflow`)."""
    sup, tk, ev = "exo.events.supervisor", "exo.tasks.r1", "exo.events.runner.r1"
    shard = Shard(model_id="local/tiny")
    hi = (ChatMessage("user", "hi"),)

    def done(tid: str, n: int) -> TaskStatusUpdated:
        return TaskStatusUpdated(
            event_id=f"i:{n}", runner_id="r1", incarnation=1, task_id=tid, task_status=TaskStatus.COMPLETE
        )

    return [
        ("exo.commands", PlaceInstance(command_id="p", model_id="local/tiny")),
        (
            sup,
            InstancePlaced(
                event_id="placed",
                instance_id="inst-p",
                model_id="local/tiny",
                placements=(Placement(runner_id="r1", shard=shard, incarnation=1),),
                attempt=1,
            ),
        ),
        (tk, DownloadModel(task_id="inst-p.a1.download.r1", instance_id="inst-p", shard=shard)),
        (ev, done("inst-p.a1.download.r1", 1)),
        (tk, LoadModel(task_id="inst-p.a1.load.r1", instance_id="inst-p", shard=shard)),
        (ev, done("inst-p.a1.load.r1", 2)),
        (tk, StartWarmup(task_id="inst-p.a1.warmup.r1", instance_id="inst-p")),
        (ev, done("inst-p.a1.warmup.r1", 3)),
        ("exo.commands", RouteChatCompletion(command_id="c", messages=hi)),
        (tk, ChatCompletion(task_id="chat-c.0", instance_id="inst-p", messages=hi, stream_id="chat-c")),
        (ev, done("chat-c.0", 4)),
        (sup, InstanceFailed(event_id="failed", instance_id="inst-p", reason="runner r1 is Lost", attempt=1)),
        (sup, InstanceRetryDue(event_id="retry", instance_id="inst-p", attempt=1)),
        ("exo.commands", DeleteInstance(instance_id="inst-p")),
        ("exo.commands", b'{"type":"PlaceInstance"}'),
    ]


def test_instance_workflow_projection() -> None:
    pairs = _workflow("r1")[:2] + _instance_workflow()
    envs = [_env(i + 1, s, m) for i, (s, m) in enumerate(pairs)]
    at_ready = _fold(envs[:10])
    inst = at_ready.instances["inst-p"]
    assert inst.status == "Ready" and inst.attempt == 1 and at_ready.runner_instances == {"r1": "inst-p"}
    state = _fold(envs)
    assert state.chats["chat-c"].status == "Complete" and state.chats["chat-c"].instance_id == "inst-p"
    assert not state.pending_chats and not state.chat_tasks
    assert state.instances["inst-p"].status == "Deleted"
    assert state.instances["inst-p"].reason == "deleted by command 16"
    assert [a.kind for a in state.anomalies] == ["BadCommand"]
    assert state.supervisor_seq == 15


def test_workflow_projection() -> None:
    state = _fold(_log(("r1",)))
    r1 = state.runners["r1"]
    assert r1.status == "RunnerLost"
    assert r1.incarnation == 1 and r1.last_event_seq == 29
    assert state.tasks["c"].status == TaskStatus.COMPLETE
    assert state.tasks["c"].result is not None and len(state.tasks["c"].result["text"]) < 300
    assert state.tasks["25"].task_type == "Invalid" and state.tasks["25"].status == TaskStatus.FAILED
    assert state.downloads["r1/local/tiny"].downloaded_bytes == 5
    load = state.loads["r1/local/tiny"]
    assert (load.task_id, load.layers_loaded, load.layers_total, load.updated_seq) == ("l", 3, 4, 12)
    kinds = [(a.seq, a.kind) for a in state.anomalies]
    assert kinds == [(25, "BadTask"), (27, "InvalidTransition")]
    assert state.anomalies[1].detail == "RunnerReady -> RunnerLoading"


def test_check_flags_what_is_unfinished() -> None:
    envs = _log(("r1",))
    report = check(_fold(envs[:11]))  # stopped while loading, task l running
    assert [t.task_id for t in report.unfinished_tasks] == ["l"]
    assert [r.status for r in report.stuck_runners] == ["RunnerLoading"]
    assert not report.anomalies


def test_duplicate_event_ids_change_nothing() -> None:
    envs = _log(("r1",))
    once = _fold(envs)
    # The same events re-published under new sequences (a retried publish that
    # outlived the server's dedupe window).
    # Numbered without gaps, as the stream numbers them (a gap is a horizon).
    again = [
        Envelope(seq=len(envs) + i + 1, subject=e.subject, data=e.data)
        for i, e in enumerate(e for e in envs if e.subject.startswith("exo.events"))
    ]
    twice = _fold(again, copy_state(once))
    twice.seq = once.seq
    assert state_hash(twice) == state_hash(once)


def test_redelivered_sequences_are_skipped() -> None:
    envs = _log()
    state = _fold(envs)
    assert state_hash(_fold(envs, copy_state(state))) == state_hash(state)


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(st.integers(min_value=0, max_value=70), min_size=0, max_size=80),
    cut=st.integers(min_value=0, max_value=80),
)
def test_snapshot_at_any_cut_then_rest_equals_apply_all(picks: list[int], cut: int) -> None:
    pool = _log() + [_env(0, s, m) for s, m in _instance_workflow()]
    # Random sequences of real messages (repeats and odd orders included),
    # renumbered as the stream would number them.
    envs = [Envelope(seq=i + 1, subject=pool[p].subject, data=pool[p].data) for i, p in enumerate(picks)]
    whole = _fold(envs)
    cut = min(cut, len(envs))
    restored = load_snapshot(dump_snapshot(_fold(envs[:cut])))
    assert state_hash(_fold(envs[cut:], restored)) == state_hash(whole)
    assert load_snapshot(dump_snapshot(whole)) == whole


def test_bad_events_are_anomalies_not_exceptions() -> None:
    envs = [
        _env(1, "exo.events.runner.r1", b"\xff\xfe"),
        _env(2, "exo.events.runner.r1", b'{"type":"RunnerStatusUpdated","event_id":"x"}'),
        _env(3, "exo.events.runner.r1", b'{"type":"Nope","event_id":"y"}'),
        _env(4, "exo.tasks.r1", b'{"type":"ChatCompletion","messages":"hi"}'),
        _env(5, "exo.tasks.r1", b"x" * (2 * 1024 * 1024)),
    ]
    state = _fold(envs)
    assert [a.kind for a in state.anomalies] == ["BadEvent"] * 3 + ["BadTask"] * 2
    assert "NotJson" in state.anomalies[0].detail
    assert "MissingField" in state.anomalies[1].detail
    assert "UnknownType" in state.anomalies[2].detail
    assert "InvalidField" in state.anomalies[3].detail
    assert "PayloadTooLarge" in state.anomalies[4].detail
    assert state.seq == 5


def test_a_load_in_progress_reads_layer_k_of_n_in_state_and_on_the_page() -> None:
    # Stopped after r1's LoadProgress (seq 12): r1 is Loading with 3 of its 4 layers in memory.
    reply = state_reply(_fold(_log(("r1",))[:12]), Paging(offset=0, limit=200))
    assert "\nloads in progress" in render_state(reply)
    assert "local/tiny  layer 3 of 4" in render_state(reply)
    page = render_page({**msgspec.to_builtins(reply), **PAGE_EXTRAS})
    assert '<progress max="4" value="3"></progress> <span>r1 load local/tiny: layer 3 of 4</span>' in page
    # Once the runner leaves Loading, `state` no longer lists it as in progress.
    done = state_reply(_fold(_log(("r1",))[:13]), Paging(offset=0, limit=200))
    assert "\nloads in progress" not in render_state(done)


def test_chats_in_flight_each_end_once_when_their_runner_is_lost() -> None:
    ev, tk = "exo.events.runner.r1", "exo.tasks.r1"
    n = iter(range(1_000_000))

    def meta() -> dict[str, object]:
        return {"event_id": f"r1:1:{next(n)}", "runner_id": "r1", "incarnation": 1}

    def task(tid: str, st_: TaskStatus, **kw: object) -> tuple[str, msgspec.Struct]:
        return ev, TaskStatusUpdated(**meta(), task_id=tid, task_status=st_, **kw)  # type: ignore[arg-type]

    def status(s: msgspec.Struct) -> tuple[str, msgspec.Struct]:
        return ev, RunnerStatusUpdated(**meta(), runner_status=s)  # type: ignore[arg-type]

    hi = (ChatMessage("user", "hi"),)
    pairs: list[tuple[str, msgspec.Struct]] = [
        (ev, RunnerRegistered(**meta(), host="h", pid=1)),  # type: ignore[arg-type]
        status(RunnerIdle()),
        (tk, LoadModel(task_id="l", shard=Shard(model_id="local/tiny"))),
        task("l", TaskStatus.RUNNING),
        status(RunnerLoading()),
        status(RunnerLoaded()),
        task("l", TaskStatus.COMPLETE, result={"model_id": "local/tiny", "chat_capacity": 4}),
        status(RunnerWarmingUp()),
        status(RunnerReady()),
        *[(tk, ChatCompletion(task_id=t, messages=hi)) for t in ("a", "b", "c")],
        task("a", TaskStatus.RUNNING),
        status(RunnerRunning()),
        task("b", TaskStatus.RUNNING),  # beside a: no other runner status
        task("c", TaskStatus.RUNNING),
        task("b", TaskStatus.COMPLETE, result={"text": "x"}),
    ]
    state = _fold([_env(i + 1, s, m) for i, (s, m) in enumerate(pairs)])
    r1 = state.runners["r1"]
    assert (r1.status, r1.chat_capacity, r1.running_tasks) == ("RunnerRunning", 4, ["a", "c"])
    reply = state_reply(state, Paging(offset=0, limit=200))
    assert "2/4" in render_state(reply) and "a, c" in render_state(reply)  # chats busy of capacity, and which
    assert '<td class="chats">2/4</td>' in render_page({**msgspec.to_builtins(reply), **PAGE_EXTRAS})

    lost = RunnerLost(**meta(), reason="no heartbeat for 5 s")  # type: ignore[arg-type]
    state = _fold([_env(len(pairs) + 1, ev, lost)], state)

    assert [state.tasks[t].status for t in "abc"] == [TaskStatus.FAILED, TaskStatus.COMPLETE, TaskStatus.FAILED]
    assert state.tasks["a"].error_type == state.tasks["c"].error_type == "RunnerLost"
    assert state.runners["r1"].running_tasks == [] and not state.unfinished
    assert not state.anomalies
    # A snapshot of this shape reads back; one of the first shape (no `shape`) is not read.
    assert state_hash(load_snapshot(dump_snapshot(state))) == state_hash(state)
