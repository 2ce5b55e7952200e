"""The supervisor against a real nats-server: projection, restarts, min_seq, twins, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.query_client import QueryFailed, first_answer, query
from exojet.bus.ops.server import NatsServer
from exojet.bus.replies import Connections
from exojet.bus.statuses import RunnerIdle
from tests.procs import exojet, stop

pytestmark = pytest.mark.timeout(90)


async def _register(nc: NATS, runner_id: str) -> int:
    js = nc.jetstream()
    subject = f"exo.events.runner.{runner_id}"
    await client.publish(
        js,
        subject,
        RunnerRegistered(event_id=f"{runner_id}:1:0", runner_id=runner_id, incarnation=1),
        expected_last_subject_seq=0,
    )
    ack = await client.publish(
        js,
        subject,
        RunnerStatusUpdated(
            event_id=f"{runner_id}:1:1", runner_id=runner_id, incarnation=1, runner_status=RunnerIdle()
        ),
    )
    return ack.seq


async def test_task_published_like_nats_pub_is_pending(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> None:
    sup = exojet("supervisor", "--nats", nats_server.url, log=tmp_path / "sup.log")
    try:
        await first_answer(nc)
        # What `nats pub` does: a core publish, no ack, no task id.
        await nc.publish("exo.tasks.r1", b'{"type":"DownloadModel","shard":{"model_id":"local/tiny"}}')
        seq = 1  # the first message of a fresh log; its id is its sequence
        reply = await query(nc, "task", task_id=str(seq), min_seq=seq)
        assert reply.seq >= seq
        assert reply.task.status == "Pending"
        assert reply.task.task_type == "DownloadModel"
        assert reply.task.runner_id == "r1"
        assert reply.task.model_id == "local/tiny"
    finally:
        assert stop(sup) == 0


async def test_restart_gives_same_state_and_honours_min_seq(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> None:
    sup = exojet("supervisor", "--nats", nats_server.url, "--snapshot-every", "3", log=tmp_path / "sup.log")
    try:
        await first_answer(nc)
        for i in range(5):
            await _register(nc, f"r{i}")
        last = await client.last_seq(nc.jetstream())
        before = await query(nc, "state", min_seq=last)
        assert len(before.runners) == 5
    finally:
        sup.kill()
        sup.wait()
    # Written while no supervisor runs: the restarted one must fold it too.
    last = await _register(nc, "late")
    sup = exojet("supervisor", "--nats", nats_server.url, "--snapshot-every", "3", log=tmp_path / "sup2.log")
    try:
        after = await first_answer(nc, min_seq=last, hash=True)
        assert after.seq == last
        assert set(after.runners) == {"r0", "r1", "r2", "r3", "r4", "late"}
        assert after.runners["late"].status == "RunnerIdle"
        # A min_seq beyond the log is a clear timeout error, not a stale answer.
        with pytest.raises(QueryFailed) as err:
            # Briefly: a longer wait lets liveness declare the silent runners lost, past `after`.
            await query(nc, "state", timeout=3.0, min_seq=last + 100)
        assert err.value.code == "Timeout"
        assert f"min_seq {last + 100} not reached" in err.value.message
    finally:
        assert stop(sup) == 0
    # A supervisor folding the whole log from scratch agrees with the one that used snapshots.
    replayed = await _local_fold_hash(nats_server.url)
    assert replayed == after.state_hash


async def _local_fold_hash(url: str) -> str:
    from exojet.projections.apply import apply
    from exojet.projections.state import ClusterState, state_hash

    conn = await client.connect(url)
    state = ClusterState()

    def on_env(env: object) -> None:
        nonlocal state
        state = apply(state, env)  # type: ignore[arg-type]

    await client.replay(conn, on_env)
    await conn.close()
    return state_hash(state)


async def test_two_supervisors_answer_alike(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> None:
    sups = [
        exojet("supervisor", "--nats", nats_server.url, "--id", f"s{i}", log=tmp_path / f"s{i}.log") for i in range(2)
    ]
    try:
        await first_answer(nc)
        last = 0
        for i in range(3):
            last = await _register(nc, f"r{i}")
        # Queue-group delivery picks a member at random: ask until both have
        # answered (bounded), then every answer must be the same.
        replies, answered_by = [], set()
        async with asyncio.timeout(20):
            while answered_by != {"s0", "s1"}:
                reply = await query(nc, "state", min_seq=last)
                who = reply.supervisor_id
                assert isinstance(who, str) and isinstance(reply.connections, Connections)
                answered_by.add(who)
                # Each tells its own connection's story; the projection must be the same.
                assert set(reply.connections.supervisors) == {who}
                replies.append(msgspec.structs.replace(reply, supervisor_id=msgspec.UNSET, connections=msgspec.UNSET))
        assert all(r == replies[0] for r in replies)
    finally:
        for s in sups:
            assert stop(s) == 0


async def test_bad_input_is_named_and_kills_nothing(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> None:
    sup = exojet("supervisor", "--nats", nats_server.url, log=tmp_path / "sup.log")
    try:
        await first_answer(nc)
        bad_tasks = [
            b"this is not json",
            b'{"type":"Teleport"}',
            b'{"type":"ChatCompletion","messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}',
            b'{"type":"LoadModel","shard":{"model_id":"../../etc/passwd"}}',
            b'{"type":"StartWarmup","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}',
        ]
        for data in bad_tasks:
            await nc.publish("exo.tasks.r1", data)
        await nc.publish("exo.events.runner.r1", b'{"type":"RunnerStatusUpdated","event_id":"e"}')
        # Acked, so everything published before it on this connection is stored too.
        ack = await nc.jetstream().publish(
            "exo.events.runner.r1",
            encode(
                {"type": "RunnerStatusUpdated", "event_id": "f", "runner_id": "r1", "runner_status": {"type": "Nope"}}
            ),
        )
        last = ack.seq
        reply = await query(nc, "state", min_seq=last)
        details = [a.kind + " " + a.detail for a in reply.anomalies]
        expected = [
            "BadTask NotJson",
            "BadTask UnknownType",
            "BadTask InvalidField",
            "BadTask InvalidModelId",
            "BadTask PayloadTooLarge",
            "BadEvent MissingField",
            "BadEvent InvalidField",
        ]
        assert [d[: len(e)] for d, e in zip(details, expected, strict=True)] == expected
        assert reply.seq == last == 7
        assert sup.poll() is None
        # Each bad task is tracked under its sequence, waiting for the runner's answer.
        assert [reply.tasks[str(s)].task_type for s in range(1, 6)] == ["Invalid"] * 5
        bad_query = await nc.request("exo.supervisor.task", b"{not json", timeout=5)
        assert bad_query.headers and bad_query.headers.get("Nats-Service-Error-Code") == "BadRequest"
        with pytest.raises(QueryFailed) as err:
            await query(nc, "runner", runner_id="ghost")
        assert err.value.code == "NotFound"
    finally:
        assert stop(sup) == 0


async def test_query_names_a_reply_that_is_not_a_json_object(nc: NATS) -> None:
    async def answer(msg: Msg) -> None:
        await msg.respond(b"[1, 2]")

    await nc.subscribe(subjects.QUERY_STATE, cb=answer)
    with pytest.raises(QueryFailed) as err:
        await query(nc, "state", timeout=5)
    assert err.value.code == "BadReply"
    assert "not a JSON object" in err.value.message
