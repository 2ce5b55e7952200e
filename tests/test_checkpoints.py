"""The page's timeline: checkpoints restore exactly the state they were taken of
(projections/checkpoints.py), and `/timeline/{seq}` answers from them as a fold of the
whole log would (api/timeline_index.py), the page's fold starting from a snapshot."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client as NATS

from exojet.api.live import RECENT_EVENTS, LiveCluster
from exojet.api.timeline_index import PAGE, NotKept, TimelineBusy, TimelineIndex
from exojet.bus.codec import encode
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.snapshot_store import store_snapshot
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import RunnerReady, RunnerRunning, TaskStatus
from exojet.bus.streams import SNAPSHOT_BUCKET
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.projections.apply import apply
from exojet.projections.checkpoints import Checkpoints, restore
from exojet.projections.queries import state_reply
from exojet.projections.snapshot import dump_snapshot
from exojet.projections.state import ClusterState, state_hash
from exojet.sim.run import run

pytestmark = pytest.mark.timeout(120)


def _chats(runners: int, chats: int) -> list[tuple[str, bytes]]:
    """A log of `runners` runners each serving `chats` chats, interleaved."""
    lives = []
    for r in range(runners):
        runner_id = f"r{r}"
        events, tasks = f"exo.events.runner.{runner_id}", f"exo.tasks.{runner_id}"
        written = [RunnerRegistered(event_id="", runner_id=runner_id, incarnation=1)]
        life: list[tuple[str, msgspec.Struct]] = [(events, written[0])]
        for c in range(chats):
            task_id = f"{runner_id}-c{c}"
            life += [
                (tasks, ChatCompletion(task_id=task_id, messages=(ChatMessage("user", "hi"),))),
                (events, TaskStatusUpdated(event_id="", runner_id="", task_id=task_id, task_status=TaskStatus.RUNNING)),
                (events, RunnerStatusUpdated(event_id="", runner_id="", runner_status=RunnerRunning())),
                (events, RunnerStatusUpdated(event_id="", runner_id="", runner_status=RunnerReady())),
                (
                    events,
                    TaskStatusUpdated(event_id="", runner_id="", task_id=task_id, task_status=TaskStatus.COMPLETE),
                ),
            ]
        numbered = []
        for n, (subject, message) in enumerate(life, start=1):
            if subject == events:
                message = msgspec.structs.replace(message, event_id=f"{runner_id}:1:{n}", runner_id=runner_id)
            numbered.append((subject, encode(message)))
        lives.append(numbered)
    return [life[i] for i in range(max(map(len, lives))) for life in lives if i < len(life)]


def _checked(envelopes: list[Envelope], every: int, checkpoints: Checkpoints) -> None:
    state, hashes = ClusterState(), []
    for env in envelopes:
        state = apply(state, env)
        if env.seq % every == 0:
            checkpoints.add(state)
            hashes.append(state_hash(state))
    assert [state_hash(restore(c)) for c in checkpoints.checkpoints] == hashes


@pytest.mark.parametrize("seed", range(30))
def test_a_checkpoint_restores_the_state_it_was_taken_of(seed: int) -> None:
    # The simulation's logs hold every kind of message, faults and recoveries; every collection
    # is cut into segments of about two entries, so segments are shared, replaced and cut anew.
    log = run(seed).world.stream.log
    _checked(log, 3, Checkpoints(large=1, segment_bits=1))


def test_checkpoints_of_a_busy_log_share_what_did_not_change() -> None:
    log = [Envelope(seq, s, d, time=float(seq)) for seq, (s, d) in enumerate(_chats(20, 150), start=1)]
    checkpoints = Checkpoints()
    _checked(log, 500, checkpoints)
    alone = sum(len(restore(c).tasks) for c in checkpoints.checkpoints) * 100
    assert checkpoints.held < alone / 4


async def _publish(nc: NATS, messages: list[tuple[str, bytes]]) -> list[Envelope]:
    """The messages as the log holds them (with the server's times, which retention reads)."""
    js = nc.jetstream()
    for subject, data in messages:
        await js.publish(subject, data)
    envelopes: list[Envelope] = []
    await client.replay(nc, envelopes.append)
    return envelopes


async def test_the_timeline_answers_as_a_fold_of_the_whole_log(nats_server: NatsServer, nc: NATS) -> None:
    envelopes = await _publish(nc, _chats(4, 150))
    cut = len(envelopes) // 2
    states: dict[int, bytes] = {}
    state = ClusterState()
    for env in envelopes:
        state = apply(state, env)
        states[env.seq] = msgspec.json.encode(state_reply(state, PAGE))
        if env.seq == cut:
            # The supervisor's snapshot: the page's fold starts from it, the history before is folded after.
            kv = await nc.jetstream().key_value(SNAPSHOT_BUCKET)
            await store_snapshot(kv, dump_snapshot(state), state.seq, 1024 * 1024)
    live = LiveCluster(nats_server.url)
    live.timeline = TimelineIndex(every=50)
    try:
        await live.ready()
        assert live.timeline.live_from == cut
        assert live._history is not None
        await asyncio.wait_for(live._history, 60)
        assert [m.seq for m in live.recent] == [e.seq for e in envelopes[-RECENT_EVENTS:]]
        for seq in (1, 2, 49, 50, 51, cut - 1, cut, cut + 1, cut + 77, len(envelopes)):
            event, reply = await live.state_at(seq)
            assert event is not None and event["seq"] == seq
            assert msgspec.json.encode(reply) == states[seq], seq
        assert await live.state_at(len(envelopes) + 1) == (None, None)
        live.timeline.busy = live.timeline.at_once
        with pytest.raises(TimelineBusy):
            await live.state_at(1)
    finally:
        await live.close()


async def test_the_timeline_keeps_at_most_its_bytes_dropping_the_oldest() -> None:
    log = [Envelope(seq, s, d, time=float(seq)) for seq, (s, d) in enumerate(_chats(10, 60), start=1)]
    replies: dict[int, bytes] = {}

    def indexed(max_bytes: int) -> TimelineIndex:
        index = TimelineIndex(every=40, max_bytes=max_bytes)
        state = ClusterState()
        index.started(state)
        for env in log:
            state = apply(state, env)
            index.folded(state, env)
            replies[env.seq] = msgspec.json.encode(state_reply(state, PAGE))
        return index

    half = indexed(2**40).live.held // 2
    index = indexed(half)
    assert len(log) // 3 < index.dropped_seq < len(log) * 2 // 3
    assert index.live.held <= half
    assert index.live.held == sum(map(len, index.live.blocks)) + index.live.checkpoints.held
    with pytest.raises(NotKept):
        await index.state_at(index.dropped_seq)
    for seq in (index.dropped_seq + 1, len(log) - 41, len(log)):
        event, reply = await index.state_at(seq)
        assert event is not None and msgspec.json.encode(reply) == replies[seq]
