"""Mixed versions and a rolling upgrade (issue 31, item 2): exojet 0.1.0's processes (commit a554f59,
built into a venv of their own by tests/old_version.py) beside this version's, on one nats-server,
with the tiny llama (0.1.0's runners on MLX, capacity 1; this version's on llama.cpp's GGUF beside it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from exojet.bus.nats import client
from exojet.bus.tasks import ChatCompletion
from exojet.projections.state import ClusterState
from testbed.log_watcher import LogWatch, LogWatcher
from tests.api_stack import ensure_streams
from tests.gguf_tiny import as_gguf
from tests.mixed_cluster import MODEL, ChatLoad, ChatOutcome, MixedCluster, one_chat, terminal_counts
from tests.old_version import old_task_fields

pytestmark = pytest.mark.slow


@pytest.fixture
def mixed(tmp_path: Path, tiny_model_dir: Path) -> Iterator[MixedCluster]:
    folder = tmp_path / "models" / "local--tiny"
    shutil.copytree(tiny_model_dir, folder)
    as_gguf(tiny_model_dir, folder / "model.gguf")
    cluster = MixedCluster(tmp_path, folder.parent)
    try:
        asyncio.run(ensure_streams(cluster.url))
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def log(mixed: MixedCluster) -> AsyncIterator[LogWatcher]:
    """Every message in the log, decoded by this version."""
    nc = await client.connect(mixed.url, name="test")
    watcher = await LogWatcher().start(nc)
    yield watcher
    await watcher.stop()
    await nc.close()


@pytest.fixture
async def watch(mixed: MixedCluster) -> AsyncIterator[LogWatch]:
    """The log folded by this version's projection, as it grows."""
    nc = await client.connect(mixed.url, name="test-watch")
    folded = LogWatch()
    await folded.start(nc)
    yield folded
    await nc.close()


async def chats_through_every_api(cluster: MixedCluster, per_api: int = 3) -> list[ChatOutcome]:
    urls = cluster.api_urls()
    return await asyncio.gather(*(one_chat(url, f"story {url[-8:]} {k}") for url in urls for k in range(per_api)))


async def ready_on(watch: LogWatch, instance_id: str, runner_id: str, timeout: float = 120) -> None:
    """Until `instance_id` is Ready on the current incarnation of `runner_id`."""

    def ready(s: ClusterState) -> bool:
        inst, runner = s.instances.get(instance_id), s.runners.get(runner_id)
        return (
            inst is not None
            and runner is not None
            and inst.status == "Ready"
            and [(p.runner_id, p.incarnation) for p in inst.placements] == [(runner_id, runner.incarnation)]
        )

    await watch.until(ready, timeout, f"{instance_id} Ready on {runner_id}")


async def stopped_mid_stream(cluster: MixedCluster, name: str, max_tokens: int) -> None:
    """SIGTERM to API `name` while a chat streams through it: the chat still ends whole."""
    accepted = asyncio.Event()
    url = f"http://127.0.0.1:{cluster.procs[name].port}/v1"
    chat = asyncio.ensure_future(one_chat(url, "a long story", max_tokens=max_tokens, accepted=accepted))
    await asyncio.wait_for(accepted.wait(), 60)
    assert not chat.done()  # mid-stream
    code = await cluster.stop_async(name)
    finished = await chat
    assert finished.error is None and finished.text, (name, finished)
    assert code in (0, -signal.SIGTERM)  # uvicorn exits, then dies of the signal it caught


# A supervisor event of a type no version writes yet, as a later version might: every reader skips it.
FUTURE_EVENT = b'{"type":"InstanceResized","event_id":"future-1","instance_id":"inst-x","format":2}'


def chat_tasks(log: LogWatcher, runner_id: str, after_seq: int = 0) -> list[dict]:
    """The ChatCompletion tasks sent to `runner_id` after `after_seq`, as JSON objects."""
    return [
        msgspec.json.decode(env.data)
        for env, _ in log.entries
        if env.subject == f"exo.tasks.{runner_id}" and env.seq > after_seq and b'"ChatCompletion"' in env.data
    ]


@pytest.mark.timeout(600)
async def test_old_and_new_processes_side_by_side(mixed: MixedCluster, log: LogWatcher, watch: LogWatch) -> None:
    # 0.1.0's supervisor with a runner of each version, and an API of each.
    mixed.supervisor("s0", "old")
    mixed.runner("r1", "new")
    mixed.runner("r2", "old")
    for name, version in (("a-old", "old"), ("a-new", "new")):
        await asyncio.to_thread(mixed.api, name, version)  # type: ignore[arg-type]
    # The seed workflow, driven by the old supervisor: download, load, warm up on each runner.
    placed = {}
    for runner_id in ("r1", "r2"):
        said = await mixed.cli_async("old", "place", MODEL, "--runners", runner_id, "--wait", "--timeout", "120")
        placed[runner_id] = said.split()[0]
    outcomes = await chats_through_every_api(mixed)
    assert [o.error for o in outcomes] == [None] * len(outcomes) and all(o.text for o in outcomes), outcomes
    # What the old supervisor cannot read it skips, as it always has, and serves on.
    nc = await client.connect(mixed.url, name="test")
    await client.publish(nc.jetstream(), "exo.events.supervisor", FUTURE_EVENT)
    outcomes = await chats_through_every_api(mixed, per_api=1)
    assert [o.error for o in outcomes] == [None] * len(outcomes), outcomes
    old_check = mixed.run("old", "replay", "--check")
    # Everything this version's runner and API wrote, 0.1.0 reads; the future event alone it skips.
    assert old_check.returncode == 1 and old_check.stdout.count("anomaly at seq") == 1, old_check.stdout
    assert "BadEvent" in old_check.stdout and "InstanceResized" in old_check.stdout

    # This version's supervisor in its place, serving the old runner beside the new.
    mixed.stop("s0")
    mixed.supervisor("s0", "new")
    state = json.loads(await mixed.cli_async("new", "state", "--json"))
    # The old runner states no capacity: it is given one chat at a time.
    assert state["runners"]["r2"]["chat_capacity"] == 1 and state["runners"]["r1"]["chat_capacity"] > 1
    # r1 drained: every chat goes to the old runner, queued one at a time.
    before = log.entries[-1][0].seq
    await mixed.cli_async("new", "drain", "r1", "--wait", "--timeout", "120")
    outcomes = await chats_through_every_api(mixed)
    assert [o.error for o in outcomes] == [None] * len(outcomes), outcomes
    sent = chat_tasks(log, "r2", before)
    assert len(sent) == len(outcomes)
    # Never a field it would ignore: what 0.1.0 does not know is only ever at its default.
    known = old_task_fields()["ChatCompletion"]
    defaults = {
        f.encode_name: msgspec.json.encode(f.default)
        for f in msgspec.structs.fields(ChatCompletion)
        if f.default is not msgspec.NODEFAULT
    }
    for task in sent:
        meant = {k: v for k, v in task.items() if k not in known and msgspec.json.encode(v) != defaults[k]}
        assert meant == {}, task
    await mixed.cli_async("new", "undrain", "r1")
    await ready_on(watch, placed["r1"], "r1")
    new_check = mixed.run("new", "replay", "--check")
    assert new_check.stdout.count("anomaly at seq") == 1 and "InstanceResized" in new_check.stdout, new_check.stdout
    counts = terminal_counts(log)
    assert {t: n for t, n in counts.items() if n != 1} == {}
    await nc.close()


@pytest.mark.timeout(900)
async def test_a_rolling_upgrade_under_a_stream_of_chats(mixed: MixedCluster, log: LogWatcher, watch: LogWatch) -> None:
    for name in ("s0", "s1"):
        mixed.supervisor(name, "old")
    for name in ("r1", "r2"):
        mixed.runner(name, "old")
    for name in ("a0", "a1"):
        await asyncio.to_thread(mixed.api, name, "old")
    placed = {}
    for runner_id in ("r1", "r2"):
        said = await mixed.cli_async("old", "place", MODEL, "--runners", runner_id, "--wait", "--timeout", "120")
        placed[runner_id] = said.split()[0]
    load = ChatLoad(mixed, workers=3).start()
    await load.served(3, 120)

    # Supervisors first, one at a time: the drains below are then decided by this version.
    for name in ("s0", "s1"):
        await mixed.stop_async(name)
        mixed.supervisor(name, "new")
        await load.served(3, 120)
    # Each API stopped with a stream in flight, which it finishes before it exits.
    for name in ("a0", "a1"):
        await stopped_mid_stream(mixed, name, max_tokens=300)
        await asyncio.to_thread(mixed.api, name, "new")
        await load.served(3, 120)
    # Runners one at a time: drained (their chats finish first), replaced, undrained, Ready again.
    for runner_id in ("r1", "r2"):
        said = await mixed.cli_async("new", "drain", runner_id, "--wait", "--timeout", "120")
        assert f"{runner_id} is drained" in said
        await mixed.stop_async(runner_id)
        mixed.runner(runner_id, "new")
        await mixed.cli_async("new", "undrain", runner_id)
        await ready_on(watch, placed[runner_id], runner_id)
        await load.served(3, 120)
    outcomes = await load.stop()
    # And this version's API too (longer: this version's runners on llama.cpp are 10x faster).
    await stopped_mid_stream(mixed, "a0", max_tokens=600)

    failed = [o for o in outcomes if o.accepted and o.error is not None]
    accepted = sum(o.accepted for o in outcomes)
    print(f"\nrolling upgrade: {len(outcomes)} chats, {accepted} accepted by an API, {len(failed)} of them failed")
    assert failed == [] and accepted >= 20
    counts = terminal_counts(log)
    assert {t: n for t, n in counts.items() if n != 1} == {}
