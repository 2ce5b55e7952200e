"""Every bound crossed by a real runner and supervisor, then every CLI command and query on top."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from exojet.bus import streams
from exojet.bus.nats import client
from exojet.bus.nats.query_client import first_answer, query
from exojet.bus.ops.server import NatsServer
from tests.procs import exojet, exojet_run, stop

pytestmark = pytest.mark.timeout(300)

KEEP = 5
CHATS = 16


def _chat(url: str, task_id: str) -> None:
    task = {"type": "ChatCompletion", "task_id": task_id, "messages": [{"role": "user", "content": "hi"}]}
    out = exojet_run("task", "r1", json.dumps({**task, "max_tokens": 2}), "--wait", url=url)
    assert out.returncode == 0, out.stdout + out.stderr


def _state(url: str, *args: str) -> dict:
    out = exojet_run("state", "--json", *args, url=url)
    assert out.returncode == 0, out.stderr
    reply: dict = json.loads(out.stdout)
    return reply


async def test_a_small_window_and_a_small_log_answer_alike_through_every_command(
    nats_server: NatsServer, nc: NATS, models_dir: Path, tmp_path: Path
) -> None:
    url = nats_server.url
    supervisor_args = [
        *("supervisor", "--nats", url, "--models-dir", str(models_dir)),
        *("--keep-finished", str(KEEP), "--keep-anomalies", "3", "--snapshot-every", "20"),
        *("--log-max-bytes", "20000"),
    ]
    sup = exojet(*supervisor_args, log=tmp_path / "sup.log")
    runner = exojet("runner", "--id", "r1", "--nats", url, "--models-dir", str(models_dir), log=tmp_path / "r1.log")
    try:
        await first_answer(nc)
        placed = exojet_run("place", "local/tiny", "--runners", "r1", "--wait", url=url)
        assert placed.returncode == 0, placed.stderr
        instance_id = placed.stdout.split()[0]
        for i in range(CHATS // 2):
            _chat(url, f"c{i}")
        archive = tmp_path / "early.jsonl.gz"
        assert exojet_run("log", "export", str(archive), url=url).returncode == 0
        for i in range(CHATS // 2, CHATS):
            _chat(url, f"c{i}")
        for _ in range(6):  # anomalies past their window
            await nc.publish("exo.tasks.r1", b"not json")
        await nc.flush()
        routed = exojet_run("chat", "Say hi", "--max-tokens", "2", url=url)
        assert routed.returncode == 0, routed.stderr

        # The log outgrew its bytes: its oldest messages are gone.
        js = nc.jetstream()
        info = await js.stream_info(streams.LOG_STREAM)
        assert info.state.first_seq > 1

        reply = _state(url, "--min-seq", str(info.state.last_seq))
        assert reply["pruned"] > 0 and "warning" not in reply
        finished = [t for t in reply["tasks"].values() if t["status"] in ("Complete", "Failed")]
        # The window, one batch over it, and the step tasks the live instance holds.
        assert len(finished) <= KEEP + 1 + 3
        assert reply["anomaly_count"] >= 6 and len(reply["anomalies"]) <= 4
        assert reply["instances"][instance_id]["status"] == "Ready"
        assert reply["runners"]["r1"]["status"] == "RunnerReady"

        # An old task: the supervisor says where it is; the archive still has it.
        gone = exojet_run("state", "--task", "c0", url=url)
        assert gone.returncode == 1 and "exojet replay --task c0" in gone.stderr
        old = exojet_run("replay", "--task", "c0", "--file", str(archive), url=url)
        assert old.returncode == 0 and "c0" in old.stdout and "Complete" in old.stdout
        newest = next(t for t in reply["tasks"].values() if t["status"] == "Complete")["task_id"]
        assert _state(url, "--task", newest)["task"]["status"] == "Complete"
        assert _state(url, "--runner", "r1")["runner"]["status"] == "RunnerReady"
        assert _state(url, "--instance", instance_id)["instance"]["status"] == "Ready"
        page = _state(url, "--limit", "2", "--offset", "2")
        assert len(page["tasks"]) == 2 and page["tasks_page"]["offset"] == 2
        assert exojet_run("state", url=url).returncode == 0
        # The trimmed log checks from its horizon: only the bad tasks are anomalies.
        check = exojet_run("replay", "--check", url=url)
        assert check.returncode == 1 and "starts at seq" in check.stdout
        assert {line.split(": ")[1] for line in check.stdout.splitlines() if line.startswith("anomaly")} == {"BadTask"}

        # A restarted supervisor (from its snapshot) answers alike.
        assert stop(sup) == 0
        sup = exojet(*supervisor_args, log=tmp_path / "sup2.log")
        again = await first_answer(nc, min_seq=reply["seq"])
        assert again.pruned >= reply["pruned"] and again.warning is msgspec.UNSET
        assert (await query(nc, "instance", instance_id=instance_id)).instance.status == "Ready"
        assert exojet_run("chat", "Say hi again", "--max-tokens", "2", url=url).returncode == 0
        assert exojet_run("delete", instance_id, url=url).returncode == 0
        assert await client.last_seq(js) > reply["seq"]
    finally:
        stop(runner)
        stop(sup)
