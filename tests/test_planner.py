"""The planner, purely: hand-made logs folded by the projection, plans checked action by action,
whole placements played by `Cluster` (tests/planner_cluster.py) without a server.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exojet.bus import subjects
from exojet.bus.commands import DeleteInstance, DrainRunner, PlaceInstance, RouteChatCompletion, UndrainRunner
from exojet.bus.events import (
    InstanceFailed,
    InstancePlaced,
    InstanceRetryDue,
    RunnerLost,
)
from exojet.bus.statuses import (
    TaskStatus,
)
from exojet.bus.tasks import (
    ChatMessage,
    ConnectToGroup,
    LoadModel,
    Shard,
    Task,
    UnloadModel,
    task_type,
)
from exojet.bus.views import InstanceView
from exojet.projections.apply import apply
from exojet.projections.explain import cause
from exojet.projections.placing import waiting_reason
from exojet.projections.state import ClusterState, state_hash
from exojet.supervisor.actions import PlannerConfig, RetryWait, WriteEvent
from exojet.supervisor.placement import split_layers
from exojet.supervisor.planner import plan
from tests.planner_cluster import Cluster, ready_single

pytestmark = pytest.mark.timeout(60)


# The runner statuses each task goes through (a download returns to Idle: it precedes any group).
def _placing(c: Cluster, model: str = "local/tiny") -> InstanceView:
    c.command(PlaceInstance(model_id=model))
    return list(c.state.instances.values())[-1]


def _types(done: list[tuple[str, Task]]) -> list[str]:
    return [task_type(t) for _, t in done]


def test_one_runner_goes_download_load_warmup_then_ready() -> None:
    c = Cluster()
    c.register("r1")
    c.command(PlaceInstance(model_id="local/tiny"))
    inst = c.state.instances["inst-3"]
    assert inst.status == "Placing"
    [placed] = plan(c.state)
    assert isinstance(placed, WriteEvent) and isinstance(placed.event, InstancePlaced)
    assert placed.fence == 0
    assert placed.event.placements[0].shard == Shard(model_id="local/tiny")
    done = c.run()
    assert _types(done) == ["DownloadModel", "LoadModel", "StartWarmup"]
    assert [t.task_id for _, t in done] == ["inst-3.a1.download.r1", "inst-3.a1.load.r1", "inst-3.a1.warmup.r1"]
    assert c.state.instances["inst-3"].status == "Ready"
    assert not c.state.anomalies


def test_a_step_waits_for_every_runner_and_a_group_splits_by_memory() -> None:
    c = Cluster()
    c.register("big", memory_free=3000)
    c.register("small", memory_free=1000)
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.publish(plan(c.state, {"local/tiny": 8}))
    inst = next(iter(c.state.instances.values()))
    assert [(p.runner_id, p.shard.start_layer, p.shard.end_layer) for p in inst.placements] == [
        ("big", 0, 6),
        ("small", 6, 8),
    ]
    assert inst.hosts == ["10.0.0.1:52400", "10.0.0.1:52401"]
    downloads = c.publish(plan(c.state))
    assert [task_type(t) for t in downloads] == ["DownloadModel", "DownloadModel"]
    assert inst.status == "Downloading"
    c.complete("big", downloads[0])
    # One download is not all of them: nothing new yet, and nothing twice.
    assert plan(c.state) == []
    c.complete("small", downloads[1])
    connects = c.publish(plan(c.state))
    assert inst.status == "Connecting"
    assert [(t.group.rank, t.group.world_size, t.group.hosts) for t in connects if isinstance(t, ConnectToGroup)] == [
        (0, 2, tuple(inst.hosts)),
        (1, 2, tuple(inst.hosts)),
    ]
    for runner, task in zip(("big", "small"), connects, strict=True):
        c.complete(runner, task)
    done = c.run()
    assert _types(done) == ["LoadModel"] * 2 + ["StartWarmup"] * 2
    loads = [t for _, t in done if isinstance(t, LoadModel)]
    assert [(t.shard.device_rank, t.shard.world_size, t.shard.n_layers) for t in loads] == [(0, 2, 8), (1, 2, 8)]
    assert inst.status == "Ready"


def test_a_group_retried_after_a_failed_connect_listens_on_the_next_ports() -> None:
    """A port found taken on a host (another program, an outgoing connection's ephemeral
    port) fails one attempt, not every one: each attempt takes the next free ports."""
    c = Cluster()
    c.register("big", memory_free=3000)
    c.register("small", memory_free=1000)
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    config = PlannerConfig(port_count=5, max_attempts=4)
    seen = []
    for attempt in (1, 2, 3):
        c.publish(plan(c.state, {"local/tiny": 8}, config=config))
        inst = next(iter(c.state.instances.values()))
        assert inst.attempt == attempt
        seen.append(inst.hosts)
        for runner, download in zip(("big", "small"), c.publish(plan(c.state, config=config)), strict=True):
            c.complete(runner, download)
        # Rank 0 cannot listen; rank 1 then finds no rank 0.
        for runner, connect in zip(("big", "small"), c.publish(plan(c.state, config=config)), strict=True):
            c.complete(runner, connect, TaskStatus.FAILED)
        c.publish(plan(c.state, config=config))
        assert inst.status == "Failed" and not inst.gave_up
        c.put(
            subjects.SUPERVISOR_EVENTS,
            InstanceRetryDue(event_id=f"rd{attempt}", instance_id=inst.instance_id, attempt=attempt),
        )
    # Five ports: the third attempt wraps around to the first free ones.
    assert seen == [
        ["10.0.0.1:52400", "10.0.0.1:52401"],
        ["10.0.0.1:52402", "10.0.0.1:52403"],
        ["10.0.0.1:52404", "10.0.0.1:52400"],
    ]


def test_a_group_goes_only_to_runners_with_an_engine_that_can_join_one_and_a_ring_key() -> None:
    c = Cluster()
    c.register("gguf-only", memory_free=9000, engines=("llamacpp",))
    c.register("both", engines=("llamacpp", "mlx"))
    c.register("keyless", memory_free=5000, ring_key="")
    c.register("mlx")
    c.register("none", memory_free=8000, engines=())  # lists no engine: never placed
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.publish(plan(c.state, {"local/tiny": 8}))
    inst = next(iter(c.state.instances.values()))
    assert sorted(p.runner_id for p in inst.placements) == ["both", "mlx"]

    # A single-runner instance may go to any engine: the freest runner that lists one takes it.
    c.command(PlaceInstance(model_id="local/tiny"))
    c.publish(plan(c.state))
    [single] = [i for i in c.state.instances.values() if i is not inst]
    assert [p.runner_id for p in single.placements] == ["gguf-only"]


def test_runners_asked_for_that_can_never_take_an_instance_fail_it_naming_why() -> None:
    c = Cluster()
    c.register("keyless", ring_key="")
    c.register("mlx")
    c.register("none", engines=())
    c.command(PlaceInstance(model_id="local/tiny", runners=("mlx", "keyless"), min_runners=2))
    c.command(PlaceInstance(model_id="local/tiny", runners=("none",)))
    c.publish(plan(c.state, {"local/tiny": 8}))
    c.publish(plan(c.state, {"local/tiny": 8}))
    group, single = c.state.instances.values()
    assert group.status == single.status == "Failed" and group.gave_up and single.gave_up
    assert (group.reason or "").startswith("NoRingKey: keyless registered no ring key")
    assert (single.reason or "").startswith("NoEngines: none registered no engines")


def test_a_placing_instance_says_what_it_waits_for_and_a_drained_one_waits_for_a_free_runner() -> None:
    c = Cluster()
    assert waiting_reason(c.state, _placing(c)) == (
        "waiting for a free runner: none has registered (start one: `exojet runner` or `exojet up`)"
    )
    c.register("r1")
    c.run()
    first = c.state.instances["inst-1"]
    assert first.status == "Ready" and first.reason is None
    second = _placing(c, "nobody/none")
    assert waiting_reason(c.state, second) == "waiting for a free runner: r1 serves inst-1 (local/tiny, Ready)"
    assert waiting_reason(c.state, first) is None
    # Drained with nowhere to move: the instance waits for a free runner, saying so.
    c.command(DrainRunner(runner_id="r1"))
    c.publish(plan(c.state))
    assert first.status == "Failed" and "r1 drained for maintenance" in (first.reason or "")
    c.put(subjects.SUPERVISOR_EVENTS, InstanceRetryDue(event_id="rd", instance_id="inst-1", attempt=1))
    c.run()
    assert first.status == "Placing"
    assert waiting_reason(c.state, first) == "waiting for a free runner: r1 is drained (`exojet undrain r1`)"
    assert "r1 is drained (`exojet undrain r1`)" in cause(c.state, "instance", first.instance_id, [])
    # Back on r1 once undrained: Ready, and the drain's reason is gone with the status it explained.
    c.command(UndrainRunner(runner_id="r1"))
    c.run()
    assert first.status == "Ready" and first.reason is None


def test_a_group_without_a_layer_count_is_split_from_what_its_downloads_report() -> None:
    c = Cluster()
    c.register("big", memory_free=3000)
    c.register("small", memory_free=1000)
    c.model_layers = 8
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.publish(plan(c.state))
    inst = next(iter(c.state.instances.values()))
    # Placed before anyone knows the layers: ranks only, no ranges yet.
    assert [(p.shard.device_rank, p.shard.world_size, p.shard.start_layer) for p in inst.placements] == [
        (0, 2, None),
        (1, 2, None),
    ]
    done = c.run()
    loads = [(r, t.shard) for r, t in done if isinstance(t, LoadModel)]
    assert [(r, s.start_layer, s.end_layer, s.n_layers, s.device_rank) for r, s in loads] == [
        ("big", 0, 6, 8, 0),
        ("small", 6, 8, 8, 1),
    ]
    assert inst.status == "Ready"


def test_a_group_whose_downloads_report_no_layer_count_fails_for_good() -> None:
    c = Cluster()
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    done = c.run()
    # Failed at the load step; the group the runners joined is let go.
    assert _types(done) == ["DownloadModel"] * 2 + ["ConnectToGroup"] * 2 + ["UnloadModel"] * 2
    inst = next(iter(c.state.instances.values()))
    assert inst.status == "Failed" and inst.gave_up
    assert "reported no layer count" in (inst.reason or "")
    assert [a for a in plan(c.state) if not isinstance(a, RetryWait)] == []


def test_placing_waits_for_enough_idle_runners() -> None:
    c = Cluster()
    c.register("r1")
    c.command(PlaceInstance(model_id="local/tiny", runners=("r1", "r2")))
    assert plan(c.state) == []
    c.register("r2")
    [placed] = plan(c.state, {"local/tiny": 4})
    assert [p.runner_id for p in placed.event.placements] == ["r1", "r2"]


@given(n_layers=st.integers(1, 200), memory=st.lists(st.integers(0, 10**12), min_size=1, max_size=8))
def test_split_layers_is_contiguous_and_gives_each_a_layer(n_layers: int, memory: list[int]) -> None:
    if n_layers < len(memory):
        return
    shards = split_layers("m", n_layers, memory)
    assert shards[0].start_layer == 0 and shards[-1].end_layer == n_layers
    assert all(a.end_layer == b.start_layer for a, b in itertools.pairwise(shards))
    assert all(s.end_layer - s.start_layer >= 1 for s in shards)
    assert [s.device_rank for s in shards] == list(range(len(memory)))


def test_replanning_a_replayed_log_publishes_nothing_twice() -> None:
    c = Cluster()
    c.register("r1")
    c.command(PlaceInstance(model_id="local/tiny"))
    c.publish(plan(c.state))
    first = c.publish(plan(c.state))  # the download, not answered yet
    # A restarted or second supervisor folds the same log from scratch.
    replayed = ClusterState()
    for env in c.log:
        replayed = apply(replayed, env)
    assert state_hash(replayed) == state_hash(c.state)
    assert plan(replayed) == []
    c.complete("r1", first[0])
    assert plan(c.state) == plan(c.state)  # deterministic: same state, same plan


def test_chats_go_to_the_least_busy_ready_instance_of_their_model() -> None:
    c = Cluster()
    for r in ("r1", "r2", "r3"):
        c.register(r)
    a, b = ready_single(c, "r1"), ready_single(c, "r2")
    ready_single(c, "r3", model="local/other")
    hi = (ChatMessage("user", "hi"),)
    c.command(RouteChatCompletion(command_id="x", messages=hi, model_id="local/tiny"))
    c.command(RouteChatCompletion(command_id="y", messages=hi, model_id="local/tiny"))
    c.command(RouteChatCompletion(command_id="z", messages=hi, model_id="local/nowhere"))
    sent = c.publish(plan(c.state))
    assert [(t.task_id, t.stream_id) for t in sent] == [("chat-x.0", "chat-x"), ("chat-y.0", "chat-y")]
    assert {t.instance_id for t in sent} == {a, b}  # one each: the second goes to the idle one
    assert c.state.instances[a].chats_in_flight == c.state.instances[b].chats_in_flight == 1
    assert list(c.state.pending_chats) == ["chat-z"]  # no Ready instance serves that model
    done, busy = sent if sent[0].instance_id == a else sent[::-1]
    c.complete("r1", done)
    assert c.state.chats[done.stream_id].status == "Complete" and c.state.instances[a].chats_in_flight == 0
    c.command(RouteChatCompletion(command_id="w", messages=hi, model_id="local/tiny"))
    [again] = c.publish(plan(c.state))
    assert again.instance_id == a  # b still has a chat in flight
    assert c.state.chats[busy.stream_id].status == "Routed"


def test_a_chat_past_every_instance_queue_is_refused_once_and_never_routed() -> None:
    c = Cluster()
    c.register("r1")
    a = ready_single(c, "r1")
    config = PlannerConfig(max_chats_per_instance=2)
    hi = (ChatMessage("user", "hi"),)
    for command_id in ("x", "y", "z", "w"):
        c.command(RouteChatCompletion(command_id=command_id, messages=hi, model_id="local/tiny"))
    actions = plan(c.state, config=config)
    refusals = [a.event for a in actions if isinstance(a, WriteEvent)]
    assert [r.chat_id for r in refusals] == ["chat-w"] and refusals[0].error_type == "QueueFull"
    assert "2 more wait" in refusals[0].reason
    sent = c.publish(actions)
    # The runner serves one at a time and two may wait in its queue: the fourth is refused.
    assert [t.task_id for t in sent] == ["chat-x.0", "chat-y.0", "chat-z.0"]
    assert c.state.chats["chat-w"].status == "Refused" and "chat-w" not in c.state.pending_chats
    assert c.state.instances[a].chats_in_flight == 3
    assert plan(c.state, config=config) == []  # refused once, never routed later
    # A refusal that comes after another supervisor routed the chat changes nothing.
    c.publish([WriteEvent(msgspec.structs.replace(refusals[0], chat_id="chat-x", event_id="chat-x:refused"))])
    assert c.state.chats["chat-x"].status == "Routed"
    assert c.state.anomalies[-1].kind == "StaleChatRefusal"
    c.complete("r1", sent[0])
    c.command(RouteChatCompletion(command_id="v", messages=hi, model_id="local/tiny"))
    assert [t.task_id for t in c.publish(plan(c.state, config=config))] == ["chat-v.0"]  # room again


def test_chats_fill_the_free_capacity_of_the_least_loaded_instance_then_queue() -> None:
    c = Cluster()
    c.chat_capacity = 3
    for r in ("r1", "r2"):
        c.register(r)
    a, b = ready_single(c, "r1"), ready_single(c, "r2")
    assert c.state.runners["r1"].chat_capacity == 3
    hi = (ChatMessage("user", "hi"),)
    for k in range(6):
        c.command(RouteChatCompletion(command_id=f"c{k}", messages=hi, model_id="local/tiny"))

    sent = c.publish(plan(c.state))

    ids = [t.instance_id for t in sent]
    assert (ids.count(a), ids.count(b)) == (3, 3)
    assert all(x != y for x, y in itertools.pairwise(ids))  # each to the less loaded one
    on_b = next(t for t in sent if t.instance_id == b)
    c.complete("r2", on_b)
    c.command(RouteChatCompletion(command_id="c6", messages=hi, model_id="local/tiny"))
    [again] = c.publish(plan(c.state))
    assert (again.stream_id, again.instance_id) == ("chat-c6", b)  # where a slot came free
    config = PlannerConfig(max_chats_per_instance=1)
    for k in (7, 8, 9):
        c.command(RouteChatCompletion(command_id=f"c{k}", messages=hi, model_id="local/tiny"))
    actions = plan(c.state, config=config)
    # Both full (3 each): one more may queue on each, the third is refused.
    assert [type(x).__name__ for x in actions] == ["SendTask", "SendTask", "WriteEvent"]


def test_a_group_serves_one_chat_at_a_time_whatever_its_runners_could() -> None:
    c = Cluster()
    c.chat_capacity = 8
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.run({"local/tiny": 4})
    hi = (ChatMessage("user", "hi"),)
    for k in range(2):
        c.command(RouteChatCompletion(command_id=f"g{k}", messages=hi))
    sent = c.publish(plan(c.state, config=PlannerConfig(max_chats_per_instance=0)))
    assert [t.task_id for t in sent] == ["chat-g0.0"]  # capacity 1, and no room to queue here
    assert c.state.chats["chat-g1"].status == "Refused"


def test_a_group_chat_publishes_rank_zero_first_then_the_others_to_the_same_instance() -> None:
    c = Cluster()
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.run({"local/tiny": 4})
    c.command(RouteChatCompletion(command_id="g", messages=(ChatMessage("user", "hi"),)))
    [rank0] = c.publish(plan(c.state))
    assert rank0.task_id == "chat-g.0" and rank0.emit_rank == 0
    [rank1] = c.publish(plan(c.state))
    assert rank1.task_id == "chat-g.1" and rank1.stream_id == "chat-g"
    assert plan(c.state) == [] and not c.state.pending_chats and c.state.chats["chat-g"].request is None


def test_a_lost_runner_fails_the_instance_which_is_retried_elsewhere_then_given_up() -> None:
    c = Cluster()
    for r in ("r1", "r2"):
        c.register(r)
    c.command(PlaceInstance(model_id="local/tiny"))
    c.publish(plan(c.state))
    inst = next(iter(c.state.instances.values()))
    first = inst.placements[0].runner_id
    c.publish(plan(c.state))
    c.event(first, RunnerLost, reason="no heartbeat for 5 s")
    c.publish(plan(c.state))
    assert inst.status == "Failed" and not inst.gave_up and "is Lost" in (inst.reason or "")
    assert plan(c.state) == [RetryWait(inst.instance_id, 1, 1.0)]
    c.put(subjects.SUPERVISOR_EVENTS, InstanceRetryDue(event_id="rd1", instance_id=inst.instance_id, attempt=1))
    assert inst.status == "Placing"
    done = c.run()
    other = "r2" if first == "r1" else "r1"
    assert inst.status == "Ready" and inst.attempt == 2 and inst.placements[0].runner_id == other
    assert {t.task_id.split(".")[1] for _, t in done} == {"a2"}
    # Attempt 2 served before its runner was lost: placed again (after the shortest wait), however
    # low max_attempts is, since a lost runner is the cluster's fault.
    c.event(other, RunnerLost, reason="gone")
    c.publish(plan(c.state, config=PlannerConfig(max_attempts=1)))
    assert inst.status == "Failed" and not inst.gave_up and inst.failed_unready == 0
    assert plan(c.state, config=PlannerConfig(max_attempts=1)) == [RetryWait(inst.instance_id, 2, 1.0)]


def test_only_attempts_in_a_row_that_never_got_ready_use_up_the_retries() -> None:
    c = Cluster()
    for r in ("r1", "r2", "r3", "r4"):
        c.register(r)
    c.command(PlaceInstance(model_id="local/tiny"))
    config = PlannerConfig(max_attempts=2)
    inst = next(iter(c.state.instances.values()))

    def lose_its_runner() -> None:
        c.event(inst.placements[0].runner_id, RunnerLost, reason="no heartbeat")
        c.publish(plan(c.state, config=config))

    def retry() -> None:
        event_id = f"rd{inst.attempt}"
        c.put(
            subjects.SUPERVISOR_EVENTS,
            InstanceRetryDue(event_id=event_id, instance_id=inst.instance_id, attempt=inst.attempt),
        )

    def place_and_lose_before_ready() -> None:
        c.publish(plan(c.state, config=config))  # placed
        c.publish(plan(c.state, config=config))  # its DownloadModel
        lose_its_runner()

    place_and_lose_before_ready()
    assert inst.attempt == 1 and inst.failed_unready == 1 and not inst.gave_up
    retry()
    c.run(config=config)
    assert inst.status == "Ready" and inst.attempt == 2
    lose_its_runner()  # it had served: the count starts again, the shortest wait
    assert inst.failed_unready == 0 and not inst.gave_up
    assert plan(c.state, config=config) == [RetryWait(inst.instance_id, 2, 1.0)]
    retry()
    place_and_lose_before_ready()
    assert inst.attempt == 3 and inst.failed_unready == 1 and not inst.gave_up
    retry()
    place_and_lose_before_ready()  # two in a row that never got Ready: the limit
    assert inst.attempt == 4 and inst.gave_up
    assert "gave up after 2 attempts in a row that never got Ready" in (inst.reason or "")


def test_a_drained_runner_hands_its_instance_over_and_is_left_idle() -> None:
    c = Cluster()
    c.register("r1", memory_free=2000)
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny"))
    c.run()
    inst = next(iter(c.state.instances.values()))
    assert inst.status == "Ready" and inst.placements[0].runner_id == "r1"
    c.command(DrainRunner(runner_id="r1"))
    assert c.state.drained == {"r1": len(c.log)}
    # Moving is no failure of the instance: never final, even past max_attempts.
    c.publish(plan(c.state, config=PlannerConfig(max_attempts=1)))
    assert inst.status == "Failed" and not inst.gave_up and "r1 drained" in (inst.reason or "")
    unload = [t for _, t in c.run() if isinstance(t, UnloadModel)]
    assert [t.task_id for t in unload] == [f"{inst.instance_id}.a1.unload.r1"]
    assert c.state.runners["r1"].status == "RunnerIdle"
    c.put(subjects.SUPERVISOR_EVENTS, InstanceRetryDue(event_id="rd1", instance_id=inst.instance_id, attempt=1))
    c.run()
    assert inst.status == "Ready" and inst.placements[0].runner_id == "r2"
    # Nothing new goes to a drained runner, even the freest; undrained, it takes placements again.
    c.command(PlaceInstance(model_id="local/tiny", command_id="second"))
    assert plan(c.state) == []
    c.command(UndrainRunner(runner_id="r1"))
    c.run()
    assert c.state.instances["inst-second"].placements[0].runner_id == "r1"
    assert not c.state.drained and not c.state.anomalies


def test_a_move_off_a_drained_runner_before_ready_does_not_count_toward_the_retry_limit() -> None:
    c = Cluster()
    for r in ("r1", "r2", "r3"):
        c.register(r)
    c.command(PlaceInstance(model_id="local/tiny"))
    config = PlannerConfig(max_attempts=2)
    inst = next(iter(c.state.instances.values()))

    def placed_and_downloading() -> str:
        c.publish(plan(c.state, config=config))  # placed
        c.publish(plan(c.state, config=config))  # its DownloadModel
        assert inst.status != "Ready"
        return inst.placements[0].runner_id

    def retry() -> None:
        event_id = f"rd{inst.attempt}"
        c.put(
            subjects.SUPERVISOR_EVENTS,
            InstanceRetryDue(event_id=event_id, instance_id=inst.instance_id, attempt=inst.attempt),
        )

    c.event(placed_and_downloading(), RunnerLost, reason="no heartbeat")
    c.publish(plan(c.state, config=config))
    assert inst.failed_unready == 1 and not inst.gave_up
    retry()
    c.command(DrainRunner(runner_id=placed_and_downloading()))
    [failure] = [x.event for x in plan(c.state, config=config) if isinstance(x, WriteEvent)]
    assert isinstance(failure, InstanceFailed) and failure.drained and not failure.final
    c.publish([WriteEvent(failure)])
    # The drain moved it: its own failures in a row are still one, and the backoff is one's.
    assert inst.status == "Failed" and inst.failed_unready == 1 and not inst.gave_up
    assert plan(c.state, config=config) == [RetryWait(inst.instance_id, inst.attempt, 1.0)]
    retry()
    c.event(placed_and_downloading(), RunnerLost, reason="no heartbeat")
    c.publish(plan(c.state, config=config))  # its second own failure in a row: the limit
    assert inst.gave_up and "gave up after 2 attempts in a row" in (inst.reason or "")


def test_a_drained_runner_finishes_its_chats_before_its_instance_moves_and_is_given_no_new_one() -> None:
    # Found by the rolling upgrade (tests/test_mixed_versions.py): failing the instance at once ended
    # its chats in flight in every API (they read an instance's failure as the end of its chats).
    c = Cluster()
    for r in ("r1", "r2"):
        c.register(r)
    instances = {"r1": ready_single(c, "r1"), "r2": ready_single(c, "r2")}
    hi = (ChatMessage("user", "hi"),)
    c.command(RouteChatCompletion(command_id="x", messages=hi, model_id="local/tiny"))
    [chat] = c.publish(plan(c.state))
    drained, other = ("r1", "r2") if chat.instance_id == instances["r1"] else ("r2", "r1")
    c.command(DrainRunner(runner_id=drained))
    # While its chat runs: nothing for its instance, and new chats go to the other one only.
    c.command(RouteChatCompletion(command_id="y", messages=hi, model_id="local/tiny"))
    c.command(RouteChatCompletion(command_id="z", messages=hi, model_id="local/tiny"))
    sent = c.publish(plan(c.state))
    assert [(t.task_id, t.instance_id) for t in sent] == [
        ("chat-y.0", instances[other]),
        ("chat-z.0", instances[other]),
    ]
    assert c.state.instances[instances[drained]].status == "Ready"
    c.complete(drained, chat)
    # Its chat ended: now it moves.
    [failure] = [x.event for x in plan(c.state) if isinstance(x, WriteEvent)]
    assert failure.instance_id == instances[drained] and not failure.final
    assert f"{drained} drained for maintenance" in failure.reason


def test_backoff_doubles_and_is_capped() -> None:
    from exojet.supervisor.planner import backoff

    config = PlannerConfig(backoff_base_s=1.0, backoff_cap_s=5.0)
    assert [backoff(a, config) for a in (0, 1, 2, 3, 4)] == [1.0, 1.0, 2.0, 4.0, 5.0]


def test_deleting_unloads_the_runners_that_hold_it_once_then_they_are_free() -> None:
    c = Cluster()
    c.register("r1")
    instance_id = ready_single(c, "r1")
    c.command(DeleteInstance(instance_id=instance_id))
    assert c.state.instances[instance_id].status == "Deleted"
    [unload] = c.publish(plan(c.state))
    assert task_type(unload) == "UnloadModel" and unload.task_id == f"{instance_id}.a1.unload.r1"
    assert plan(c.state) == []  # already in the log
    c.complete("r1", unload)
    assert c.state.runners["r1"].status == "RunnerIdle"
    ready_single(c, "r1")


def test_a_restarted_runner_fails_its_instance_and_is_usable_again() -> None:
    c = Cluster()
    c.register("r1")
    instance_id = ready_single(c, "r1")
    c.register("r1")  # a new incarnation: the model it held is gone
    c.publish(plan(c.state))
    assert "restarted (incarnation 1 -> 2)" in (c.state.instances[instance_id].reason or "")
    c.command(PlaceInstance(model_id="local/tiny", runners=("r1",)))
    c.run()
    assert c.state.instances[c.state.runner_instances["r1"]].status == "Ready"


def test_a_stale_placement_is_an_anomaly_not_a_second_placement() -> None:
    c = Cluster()
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny"))
    [placed] = plan(c.state)
    c.publish([placed])
    other = msgspec.structs.replace(placed.event, event_id="someone-else")
    c.put(subjects.SUPERVISOR_EVENTS, other)
    assert [a.kind for a in c.state.anomalies] == ["StaleInstanceEvent"]
    assert next(iter(c.state.instances.values())).placements == list(placed.event.placements)


def test_a_failed_task_fails_the_instance() -> None:
    c = Cluster()
    c.register("r1")
    c.command(PlaceInstance(model_id="local/tiny"))
    c.publish(plan(c.state))
    [download] = c.publish(plan(c.state))
    c.complete("r1", download, TaskStatus.FAILED)
    [failed] = plan(c.state)
    assert isinstance(failed, WriteEvent) and "DownloadModel on r1 Failed" in failed.event.reason
