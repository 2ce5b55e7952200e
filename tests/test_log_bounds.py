"""A bounded log: limits, archives read as the stream, horizons, chunked snapshots."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from exojet.bus import streams, subjects
from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.snapshot_store import SNAPSHOT_KEY, store_snapshot
from exojet.bus.ops.archive import ArchiveError, read_archive
from exojet.bus.statuses import RunnerIdle, TaskStatus
from exojet.bus.streams import LogLimits
from exojet.projections.snapshot import dump_snapshot
from exojet.projections.state import state_hash
from exojet.runner.event_writer import EventWriter
from exojet.runner.write_chain import Fenced, WriteChain
from exojet.supervisor.projector import Projector
from tests.procs import exojet_run
from tests.sample_logs import direct_chat, registered

pytestmark = pytest.mark.timeout(120)


async def _chats(nc: NATS, count: int, start: int = 0) -> int:
    """r1 registers (once) and serves `count` direct chats; returns the last seq."""
    js = nc.jetstream()
    flow = (registered("r1") if start == 0 else []) + [
        p for k in range(start, start + count) for p in direct_chat("r1", k, TaskStatus.COMPLETE)
    ]
    ack = None
    for subject, message in flow:
        ack = await client.publish(js, subject, message)
    assert ack is not None
    return ack.seq


async def test_a_trimmed_log_exports_replays_from_file_and_checks_from_its_horizon(
    nats_server: object, nc: NATS, tmp_path: Path
) -> None:
    url = nats_server.url  # type: ignore[attr-defined]
    js = nc.jetstream()
    await stream_setup.ensure_streams(js, log_limits=LogLimits(max_age_s=0, max_bytes=40_000))
    last = await _chats(nc, 120)
    info = await js.stream_info(streams.LOG_STREAM)
    first = info.state.first_seq
    assert first > 1 and info.state.last_seq == last  # the oldest messages are gone

    archive = tmp_path / "log.jsonl.gz"
    out = exojet_run("log", "export", str(archive), url=url)
    assert out.returncode == 0, out.stderr
    assert f"seq {first}-{last}" in out.stdout
    assert [e.seq for e in read_archive(archive)] == list(range(first, last + 1))

    # The archive reads exactly as the stream.
    from_stream = exojet_run("replay", "--json", url=url)
    from_file = exojet_run("replay", "--json", "--file", str(archive), url=url)
    assert from_stream.returncode == from_file.returncode == 0
    assert from_file.stdout == from_stream.stdout and from_file.stdout.count("\n") == last - first + 1
    # A range of it, too.
    window = ("--from", str(last - 5), "--to", str(last - 2))
    part = exojet_run("replay", "--json", *window, "--file", str(archive), url=url)
    assert part.stdout.splitlines() == from_stream.stdout.splitlines()[-6:-2]

    # Statuses of tasks published before the horizon are not anomalies.
    for source in ((), ("--file", str(archive))):
        check = exojet_run("replay", "--check", *source, url=url)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"starts at seq {first}" in check.stdout and "check: ok" in check.stdout

    # A supervisor with no snapshot older than the log's start says so, and what to do.
    projector = Projector(nc, snapshot_every=10**9)
    await projector.start()
    try:
        assert projector.state.seq == last and projector.state.horizon == first
        assert projector.gap is not None
        assert f"the log starts at seq {first}" in projector.gap and "exojet replay --file" in projector.gap
        assert projector.state.anomaly_count == 0
    finally:
        await projector.stop()

    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    bad = exojet_run("replay", "--file", str(tmp_path / "bad.gz"), url=url)
    assert bad.returncode == 1 and "not a readable gzip archive" in bad.stderr
    with pytest.raises(ArchiveError):
        list(read_archive(tmp_path / "bad.gz"))


async def test_snapshots_are_chunked_never_skipped(nats_server: object, nc: NATS) -> None:
    js = nc.jetstream()
    await stream_setup.ensure_streams(js)
    await _chats(nc, 300)
    small_payload = 6 * 1024
    first = Projector(nc, snapshot_every=10**9, max_snapshot_bytes=small_payload)
    await first.start()
    await first.snapshot()
    kv = await js.key_value(streams.SNAPSHOT_BUCKET)
    seq = first.state.seq
    assert (await kv.get(f"{SNAPSHOT_KEY}.{seq}.1")).value  # more than one chunk
    await first.stop()

    # A restart folds nothing but the snapshot, and agrees with the fold.
    second = Projector(nc, snapshot_every=10**9)
    await second.start()
    assert second.state.seq == seq and state_hash(second.state) == state_hash(first.state)
    await second.stop()

    # The next snapshot replaces the chunks of the one before.
    await _chats(nc, 1, start=300)
    third = Projector(nc, snapshot_every=10**9, max_snapshot_bytes=small_payload)
    await third.start()
    await third.snapshot()
    await third.stop()
    with pytest.raises(KeyNotFoundError):
        await kv.get(f"{SNAPSHOT_KEY}.{seq}.0")

    # A snapshot of the older, unchunked form still loads.
    await kv.put(SNAPSHOT_KEY, dump_snapshot(first.state))
    old = Projector(nc, snapshot_every=10**9)
    await old.start()
    assert old.state.seq == third.state.seq and state_hash(old.state) == state_hash(third.state)
    await old.stop()
    assert await store_snapshot(kv, b"", 1, small_payload) == 1  # an empty one is one empty chunk


async def test_an_idle_runner_whose_subject_the_limits_emptied_writes_on(nats_server: object, nc: NATS) -> None:
    js = nc.jetstream()
    await stream_setup.ensure_streams(js, log_limits=LogLimits(max_age_s=0, max_bytes=20_000))
    subject = subjects.runner_events_subject("idle")

    def idle(event_id: str, incarnation: int, at: float) -> RunnerStatusUpdated:
        return RunnerStatusUpdated(
            event_id=event_id, runner_id="idle", incarnation=incarnation, runner_status=RunnerIdle(), at=at
        )

    writer = EventWriter(js, WriteChain("idle", 1, 0, time.time))
    first = await writer.write(idle)
    await _chats(nc, 100)  # the rest of the cluster is busy: the log drops the idle runner's write
    assert await client.last_on_subject(js, subject) is None
    assert await writer.write(idle) > first
    # A twin's write in between still fences it.
    await client.publish(js, subject, idle("twin:2:1", 2, 0.0))
    with pytest.raises(Fenced):
        await writer.write(idle)
