"""Placement, restarts, twin supervisors, liveness and deletion against real processes.

Every wait is on the log itself: `LogWatch` follows the whole log, folds it
with the projection and wakes waiters after each message, so a test waits for
exactly the event it expects (bounded), and checks order from sequences.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.chat_ends import ChatError
from exojet.bus.codec import decode_event, decode_task, encode
from exojet.bus.envelope import Envelope
from exojet.bus.events import InstanceFailed, RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.chat_client import route_chat
from exojet.bus.nats.query_client import first_answer
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, RunnerIdle, RunnerLoading
from exojet.bus.tasks import ChatMessage
from exojet.bus.views import InstanceView
from exojet.projections.instances import steps
from exojet.projections.state import ClusterState
from testbed.log_watcher import LogWatch
from tests.cluster_procs import Procs, instance_in, place_instance, ready_pipeline_instance, runners_idle
from tests.procs import exojet_output


def _assert_seed_order(state: ClusterState, inst: InstanceView) -> None:
    """Each step's tasks are published only after every runner completed the previous step."""
    previous_done = 0
    for step in steps(len(inst.placements)):
        tasks = [state.tasks[f"{inst.instance_id}.a{inst.attempt}.{step}.{p.runner_id}"] for p in inst.placements]
        assert all(t.status == "Complete" for t in tasks), (step, tasks)
        assert min(t.created_seq for t in tasks) > previous_done, f"{step} published before the step before it ended"
        previous_done = max(t.updated_seq for t in tasks)


def _assert_no_duplicates(watch: LogWatch) -> None:
    ids = Counter()
    for env in watch.envs:
        if env.subject.startswith("exo.tasks."):
            ids[decode_task(env.data).task_id] += 1
        elif env.subject == subjects.SUPERVISOR_EVENTS:
            ids[decode_event(env.data).event_id] += 1
    assert [i for i, n in ids.items() if n > 1] == []
    assert [a for a in watch.state.anomalies if a.kind in ("DuplicateTask", "StaleInstanceEvent")] == []


async def _cli(*args: str) -> str:
    """`exojet ARGS` to completion (bounded); its stdout. Fails the test on a non-zero exit."""
    return await exojet_output(*args, timeout=30)


@pytest.mark.timeout(120)
async def test_supervisor_killed_after_each_step_finishes_the_placement_then_delete_unloads(
    procs: Procs, watch: LogWatch, nc: NATS
) -> None:
    runner = procs.runner("r1")
    await watch.until(runners_idle("r1"), 60, "r1 registered and Idle")

    frozen = asyncio.Event()

    def freeze_after_each_step(env: Envelope) -> None:
        # The tiny model takes milliseconds a step: freeze the runner as each
        # step ends (synchronously, from the log callback) so that the
        # supervisor is killed between steps, not after the whole placement.
        if env.subject == subjects.runner_events_subject("r1"):
            event = decode_event(env.data)
            if isinstance(event, TaskStatusUpdated) and event.task_status in TERMINAL_TASK_STATUSES:
                runner.send_signal(signal.SIGSTOP)
                frozen.set()

    watch.hooks.append(freeze_after_each_step)
    sup = procs.supervisor()
    instance_id = (await _cli("place", "local/tiny", "--nats", procs.url)).strip()
    assert instance_id.startswith("inst-")
    ready = instance_in(instance_id, "Ready")
    kills = 0
    try:
        while True:
            await watch.until(lambda s: frozen.is_set() or ready(s), 60, "the next step's end")
            if ready(watch.state):
                break
            # The supervisor may or may not have written the next step yet: the
            # one started now must finish it either way, without writing twice.
            sup.send_signal(signal.SIGKILL)
            sup.wait()
            kills += 1
            sup = procs.supervisor()
            await first_answer(nc, min_seq=watch.state.seq)  # the new one has folded the log
            frozen.clear()
            runner.send_signal(signal.SIGCONT)
    finally:
        watch.hooks.remove(freeze_after_each_step)
        runner.send_signal(signal.SIGCONT)
    assert kills >= 2  # after the download and after the load
    assert watch.state.runners["r1"].incarnation == 1  # never declared lost while frozen
    inst = watch.state.instances[instance_id]
    _assert_seed_order(watch.state, inst)
    _assert_no_duplicates(watch)
    assert watch.state.runners["r1"].status == "RunnerReady"
    # Delete: the runner that holds it unloads and is Idle again, its process alive.
    assert instance_id in await _cli("delete", instance_id, "--nats", procs.url)
    unload_id = f"{instance_id}.a{inst.attempt}.unload.r1"
    await watch.until(lambda s: unload_id in s.tasks and s.tasks[unload_id].status == "Complete", 30, "r1 unloaded")
    assert watch.state.runners["r1"].status == "RunnerIdle"
    assert watch.state.instances[instance_id].status == "Deleted"
    assert runner.poll() is None


@pytest.mark.timeout(120)
async def test_two_supervisors_place_two_instances_on_distinct_runners_and_route_a_chat(
    procs: Procs, watch: LogWatch, nc: NATS
) -> None:
    for r in ("r1", "r2"):
        procs.runner(r)
    procs.supervisor()
    procs.supervisor()
    await watch.until(runners_idle("r1", "r2"), 60, "r1, r2 Idle")
    # Both supervisors plan both placements at once: the fence on
    # exo.events.supervisor lets only one claim a runner.
    first, second = [await place_instance(nc, model_id="local/tiny") for _ in range(2)]
    await watch.until(lambda s: instance_in(first, "Ready")(s) and instance_in(second, "Ready")(s), 60, "both Ready")
    placed = [watch.state.instances[i].placements[0].runner_id for i in (first, second)]
    assert sorted(placed) == ["r1", "r2"]
    for i in (first, second):
        _assert_seed_order(watch.state, watch.state.instances[i])
    text = "".join(
        [
            t
            async for t in route_chat(
                procs.url, [ChatMessage("user", "hello")], "local/tiny", max_tokens=4, temperature=0.0, timeout=60
            )
        ]
    )
    assert text
    # route_chat saw the Complete on its own subscription; our watch may be a message behind.
    state = await watch.until(
        lambda s: any(t.task_type == "ChatCompletion" and t.status == "Complete" for t in s.tasks.values()),
        10,
        "the chat Complete",
    )
    [chat] = [t for t in state.tasks.values() if t.task_type == "ChatCompletion"]
    assert chat.instance_id in (first, second)
    assert chat.result is not None and chat.result["text"] == text
    _assert_no_duplicates(watch)
    assert not [a for a in watch.state.anomalies if a.kind == "RunnerInTwoInstances"]


@pytest.mark.timeout(120)
async def test_a_pipeline_instance_on_two_runners_connects_then_serves(procs: Procs, watch: LogWatch, nc: NATS) -> None:
    instance_id = await ready_pipeline_instance(procs, watch, nc)
    inst = watch.state.instances[instance_id]
    assert sorted(p.runner_id for p in inst.placements) == ["r1", "r2"]
    # The supervisor has no model files: the split came from what the runners' downloads reported.
    loads = [
        watch.state.tasks[f"{instance_id}.a{inst.attempt}.load.{p.runner_id}"].result or {} for p in inst.placements
    ]
    assert loads[0]["start_layer"] == 0 and loads[0]["end_layer"] == loads[1]["start_layer"]
    assert loads[1]["end_layer"] == loads[1]["n_layers"] > 1
    _assert_seed_order(watch.state, inst)
    text = "".join(
        [
            t
            async for t in route_chat(
                procs.url, [ChatMessage("user", "hello")], "local/tiny", max_tokens=4, temperature=0.0, timeout=60
            )
        ]
    )
    assert text
    # route_chat saw rank 0's Complete on its own subscription; our watch may be behind.
    state = await watch.until(
        lambda s: sum(t.task_type == "ChatCompletion" and t.status == "Complete" for t in s.tasks.values()) == 2,
        10,
        "both ranks' chats Complete",
    )
    chats = [t for t in state.tasks.values() if t.task_type == "ChatCompletion"]
    assert sorted(t.runner_id for t in chats) == ["r1", "r2"]
    assert all(t.instance_id == instance_id for t in chats)
    _assert_no_duplicates(watch)


@pytest.mark.timeout(120)
async def test_runner_killed_while_loading_is_lost_and_the_instance_is_replaced(
    nats_server: NatsServer, models_dir: Path, tmp_path: Path, watch: LogWatch, nc: NATS
) -> None:
    timeout = 3.0
    procs = Procs(nats_server.url, models_dir, tmp_path, heartbeat_timeout=timeout)
    try:
        for r in ("r1", "r2"):
            procs.runner(r)
        await watch.until(runners_idle("r1", "r2"), 60, "r1, r2 Idle")
        killed: dict[str, float] = {}

        def kill_on_loading(env: Envelope) -> None:
            # Synchronously, from the log callback: the runner is still loading.
            if env.subject.startswith(subjects.RUNNER_EVENTS_PREFIX) and not killed:
                event = decode_event(env.data)
                if isinstance(event, RunnerStatusUpdated) and isinstance(event.runner_status, RunnerLoading):
                    procs.runners[event.runner_id].send_signal(signal.SIGKILL)
                    killed[event.runner_id] = time.monotonic()

        watch.hooks.append(kill_on_loading)
        procs.supervisor()
        instance_id = await place_instance(nc, model_id="local/tiny")
        await watch.until(lambda s: bool(killed), 60, "a runner Loading")
        [(victim, at)] = killed.items()
        await watch.until(lambda s: s.runners[victim].status == "RunnerLost", timeout + 5, f"{victim} lost")
        assert time.monotonic() - at < timeout + 3
        await watch.until(instance_in(instance_id, "Ready"), 60, f"{instance_id} Ready again")
        inst = watch.state.instances[instance_id]
        survivor = "r2" if victim == "r1" else "r1"
        assert inst.attempt == 2 and [p.runner_id for p in inst.placements] == [survivor]
        # The first attempt failed because its runner was lost; that reason cleared once the
        # instance was placed again (it explained a status that ended).
        failed = [decode_event(e.data) for e in watch.envs if e.subject == subjects.SUPERVISOR_EVENTS]
        [first] = [f for f in failed if isinstance(f, InstanceFailed) and f.instance_id == instance_id]
        assert first.attempt == 1 and "is Lost" in first.reason
        assert inst.reason is None
        _assert_seed_order(watch.state, inst)
        _assert_no_duplicates(watch)
        # The lost runner comes back as a new incarnation, Idle: free for the
        # planner again (placing on it is covered by tests/test_planner.py).
        procs.runner(victim)
        await watch.until(lambda s: s.runners[victim].incarnation > 1 and runners_idle(victim)(s), 60, f"{victim} back")
    finally:
        procs.stop_all()


@pytest.mark.timeout(60)
async def test_silence_is_loss_but_events_or_heartbeats_are_life(
    nats_server: NatsServer, models_dir: Path, tmp_path: Path, watch: LogWatch, nc: NATS
) -> None:
    timeout = 1.0
    procs = Procs(nats_server.url, models_dir, tmp_path, heartbeat_timeout=timeout)
    js = nc.jetstream()
    writes = 0

    async def write(runner_id: str, message: object) -> int:
        nonlocal writes
        writes += 1
        ack = await client.publish(js, subjects.runner_events_subject(runner_id), message)
        return ack.seq

    # Simulated runners: "writer" writes events but sends no heartbeat,
    # "beater" heartbeats but writes nothing after registering, "mute" does neither.
    for r in ("writer", "beater", "mute"):
        await write(r, RunnerRegistered(event_id=f"{r}:reg", runner_id=r, incarnation=1))
        await write(
            r, RunnerStatusUpdated(event_id=f"{r}:idle", runner_id=r, incarnation=1, runner_status=RunnerIdle())
        )
    try:
        procs.supervisor()
        started = time.monotonic()
        while time.monotonic() - started < 3 * timeout:
            await write(
                "writer",
                RunnerStatusUpdated(
                    event_id=f"writer:{writes}", runner_id="writer", incarnation=1, runner_status=RunnerIdle()
                ),
            )
            await nc.publish(
                subjects.heartbeat_subject("beater"),
                encode({"runner_id": "beater", "incarnation": 1, "at": time.time()}),
            )
            await asyncio.sleep(timeout / 4)  # the simulated runners' pace, well inside the timeout
        state = await watch.until(lambda s: s.runners["mute"].status == "RunnerLost", 3 * timeout, "mute lost")
        assert state.runners["writer"].status != "RunnerLost"
        assert state.runners["beater"].status != "RunnerLost"
        assert "no heartbeat" in (state.runners["mute"].error_message or "")
        # Once the writer falls silent too, it is declared lost.
        await watch.until(lambda s: s.runners["writer"].status == "RunnerLost", 4 * timeout, "writer lost")
    finally:
        procs.stop_all()


@pytest.mark.timeout(180)
async def test_a_pipeline_rank_killed_mid_chat_fails_every_rank_and_the_instance_is_replaced(
    procs: Procs, watch: LogWatch, nc: NATS
) -> None:
    instance_id = await ready_pipeline_instance(procs, watch, nc)
    assert watch.state.instances[instance_id].attempt == 1
    chat = route_chat(
        procs.url,
        [ChatMessage("user", "Tell me a long story")],
        "local/tiny",
        max_tokens=100_000,
        temperature=0.0,
        timeout=60,
    )
    await anext(chat)  # generation is under way on both ranks
    engines = psutil.Process(procs.runners["r2"].pid).children()
    assert len(engines) == 1
    engines[0].send_signal(signal.SIGKILL)
    with pytest.raises(ChatError):
        async with asyncio.timeout(30):
            async for _ in chat:
                pass
    state = await watch.until(
        lambda s: all(t.status == "Failed" for t in s.tasks.values() if t.task_type == "ChatCompletion"),
        30,
        "both ranks' chats Failed",
    )
    chats = {t.runner_id: t for t in state.tasks.values() if t.task_type == "ChatCompletion"}
    assert sorted(chats) == ["r1", "r2"]
    assert "SIGKILL" in chats["r2"].error_message
    assert "pipeline peer" in chats["r1"].error_message
    # The failed instance is placed again on the same (released, Idle again) runners.
    await watch.until(
        lambda s: s.instances[instance_id].attempt == 2 and s.instances[instance_id].status == "Ready",
        120,
        f"{instance_id} re-placed and Ready",
    )
    _assert_no_duplicates(watch)


@pytest.mark.timeout(120)
async def test_drain_moves_the_instance_elsewhere_and_leaves_the_runner_idle(
    procs: Procs, watch: LogWatch, nc: NATS
) -> None:
    for r in ("r1", "r2"):
        procs.runner(r)
    procs.supervisor()
    await watch.until(runners_idle("r1", "r2"), 60, "r1, r2 Idle")
    instance_id = await place_instance(nc, model_id="local/tiny")
    await watch.until(instance_in(instance_id, "Ready"), 60, f"{instance_id} Ready")
    first = watch.state.instances[instance_id].placements[0].runner_id
    other = "r2" if first == "r1" else "r1"
    said = await exojet_output("drain", first, "--wait", "--timeout", "90", "--nats", procs.url, timeout=100)
    assert f"{first} is drained: Idle, holding no instance" in said
    state = await watch.until(
        lambda s: (
            s.instances[instance_id].status == "Ready" and s.instances[instance_id].placements[0].runner_id == other
        ),
        60,
        f"{instance_id} Ready on {other}",
    )
    assert state.runners[first].status == "RunnerIdle" and first in state.drained
    shown = await exojet_output("state", "--nats", procs.url)
    assert f"drained for maintenance (nothing is placed on them): {first}" in shown
    await exojet_output("undrain", first, "--nats", procs.url)
    await watch.until(lambda s: not s.drained, 10, "undrained")
    assert all(p.poll() is None for p in [*procs.supervisors, *procs.runners.values()])
