"""`exojet task`, `exojet state` and `exojet replay` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.query_client import first_answer
from exojet.bus.ops.server import NatsServer
from exojet.bus.statuses import RunnerIdle, RunnerLoading, TaskStatus
from tests.procs import exojet, exojet_run, stop

pytestmark = pytest.mark.timeout(90)


async def _write_log(nc: NATS) -> None:
    """r1 registers, gets a LoadModel, starts loading and is never heard of again."""
    js = nc.jetstream()
    ev = "exo.events.runner.r1"
    await client.publish(js, ev, RunnerRegistered(event_id="a", runner_id="r1", incarnation=1, host="box", pid=7))
    await client.publish(
        js, ev, RunnerStatusUpdated(event_id="b", runner_id="r1", incarnation=1, runner_status=RunnerIdle())
    )
    await client.publish(
        js, "exo.tasks.r1", b'{"type":"LoadModel","task_id":"load1","shard":{"model_id":"local/tiny"}}'
    )
    await client.publish(
        js,
        ev,
        TaskStatusUpdated(event_id="c", runner_id="r1", incarnation=1, task_id="load1", task_status=TaskStatus.RUNNING),
    )
    await client.publish(
        js, ev, RunnerStatusUpdated(event_id="d", runner_id="r1", incarnation=1, runner_status=RunnerLoading())
    )


async def test_task_command_validates_and_publishes(nats_server: NatsServer, nc: NATS) -> None:
    bad = exojet_run("task", "r1", '{"type":"ChatCompletion","messages":[]}', url=nats_server.url)
    assert bad.returncode == 2
    assert "InvalidField" in bad.stderr and "messages" in bad.stderr
    assert await client.last_seq(nc.jetstream()) == 0  # refused before publishing
    ok = exojet_run("task", "r1", '{"type":"StartWarmup"}', url=nats_server.url)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "task 1 seq 1"
    named = exojet_run("task", "r1", '{"type":"StartWarmup","task_id":"w1"}', url=nats_server.url)
    again = exojet_run("task", "r1", '{"type":"StartWarmup","task_id":"w1"}', url=nats_server.url)
    assert named.stdout.strip() == "task w1 seq 2"
    assert again.stdout.strip() == "task w1 seq 2 (duplicate)"


async def test_replay_timeline_json_state_and_check(nats_server: NatsServer, nc: NATS) -> None:
    await _write_log(nc)
    timeline = exojet_run("replay", url=nats_server.url)
    assert timeline.returncode == 0, timeline.stderr
    lines = timeline.stdout.splitlines()
    assert len(lines) == 5
    assert "r1 incarnation 1 on box pid 7" in lines[0]
    assert "r1: Unregistered -> RunnerIdle" in lines[1]
    assert "task load1: LoadModel local/tiny" in lines[2]
    assert "task load1: Pending -> Running" in lines[3]
    assert "r1: RunnerIdle -> RunnerLoading" in lines[4]

    only_task = exojet_run("replay", "--task", "load1", "--json", url=nats_server.url)
    objs = [json.loads(line) for line in only_task.stdout.splitlines()]
    assert [o["seq"] for o in objs] == [3, 4]
    assert objs[0]["subject"] == "exo.tasks.r1" and objs[0]["message"]["type"] == "LoadModel"

    window = exojet_run("replay", "--from", "2", "--to", "3", url=nats_server.url)
    assert [line.split()[0] for line in window.stdout.splitlines()] == ["2", "3"]

    as_of = exojet_run("replay", "--to", "2", "--state", url=nats_server.url)
    assert "Idle" in as_of.stdout and "Loading" not in as_of.stdout

    checked = exojet_run("replay", "--check", url=nats_server.url)
    assert checked.returncode == 1
    assert "unfinished task load1 (LoadModel on r1): Running" in checked.stdout
    assert "stuck runner r1: RunnerLoading" in checked.stdout
    assert exojet_run("replay", "--to", "2", "--check", url=nats_server.url).returncode == 0

    explained = exojet_run("explain", "r1", url=nats_server.url)
    assert explained.returncode == 0, explained.stderr
    out = explained.stdout.splitlines()
    assert out[0] == "runner r1: RunnerLoading"
    assert out[-1] == (
        "cause: r1 is stuck in RunnerLoading since seq 5 while task load1 (LoadModel) runs: "
        "its last event is seq 5, none has ended the transition"
    )
    unknown = exojet_run("explain", "nope", url=nats_server.url)
    assert unknown.returncode == 1 and "no runner, task, instance or chat 'nope'" in unknown.stderr


async def test_state_command_renders_the_projection(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> None:
    await _write_log(nc)
    sup = exojet("supervisor", "--nats", nats_server.url, log=tmp_path / "sup.log")
    try:
        await first_answer(nc, min_seq=5)
        table = exojet_run("state", "--min-seq", "5", url=nats_server.url)
        assert table.returncode == 0, table.stderr
        assert "seq 5" in table.stdout
        row = next(line for line in table.stdout.splitlines() if line.startswith("r1 "))
        assert row.split()[:3] == ["r1", "Loading", "1"]
        task = exojet_run("state", "--task", "load1", "--json", url=nats_server.url)
        assert json.loads(task.stdout)["task"]["status"] == "Running"
        missing = exojet_run("state", "--runner", "ghost", url=nats_server.url)
        assert missing.returncode == 1 and "NotFound" in missing.stderr
    finally:
        assert stop(sup) == 0
    nobody = exojet_run("state", "--timeout", "2", url=nats_server.url)
    assert nobody.returncode == 1 and "NoSupervisor" in nobody.stderr
    assert "waited 2 s" in nobody.stderr
