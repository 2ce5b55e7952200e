"""bus/nats/follower.py: catch-up and live follow through nats-py, against a real nats-server.

Each read must hand every message once, in order, whatever happens to the
connection or the server meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import streams
from exojet.bus.envelope import Envelope, parse_ack_reply
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer
from tests.tcp_proxy import NatsProxy

pytestmark = pytest.mark.timeout(120)


def test_ack_reply_both_forms() -> None:
    assert parse_ack_reply("$JS.ACK.EXO_LOG.c1.1.42.7.1700000000000000000.3") == (42, 7, 1700000000000000000)
    assert parse_ack_reply("$JS.ACK.dom.acchash.EXO_LOG.c1.1.42.7.1700000000000000000.3.tok") == (
        42,
        7,
        1700000000000000000,
    )


async def _fill(nc: NATS, n: int, start: int = 0) -> None:
    js = nc.jetstream()
    acks = []
    for i in range(start, start + n):
        # Headers on some (as fenced writes carry), CRLF inside payloads, two subjects.
        headers = {"Nats-Msg-Id": f"m{i}"} if i % 3 == 0 else None
        subject = "exo.events.runner.a" if i % 2 else "exo.events.runner.b"
        acks.append(await js.publish_async(subject, f'{{"i":{i},"x":"\r\n"}}'.encode(), headers=headers))
    await asyncio.gather(*acks)


async def _direct(nc: NATS, subject: str = ">") -> list[Envelope]:
    """The same messages read one by one with direct gets: the reference."""
    js = nc.jetstream()
    last = await client.last_seq(js)
    out = []
    for seq in range(1, last + 1):
        raw = await js.get_msg(streams.LOG_STREAM, seq)
        if subject in (">", raw.subject):
            out.append((seq, raw.subject, raw.data))
    return [Envelope(seq=s, subject=subj or "", data=d or b"") for s, subj, d in out]


def _strip_time(envs: list[Envelope]) -> list[Envelope]:
    return [Envelope(seq=e.seq, subject=e.subject, data=e.data) for e in envs]


async def test_replays_everything_like_direct_gets(nc: NATS) -> None:
    n = 3000
    await _fill(nc, n)
    got: list[Envelope] = []
    assert await client.replay(nc, got.append) == n
    assert _strip_time(got) == await _direct(nc)
    assert all(e.time > 0 for e in got)


async def test_a_subject_and_a_sub_range(nc: NATS) -> None:
    n = 500
    await _fill(nc, n)
    on_a: list[Envelope] = []
    assert await client.replay_subject(nc, "exo.events.runner.a", on_a.append) == n
    assert _strip_time(on_a) == await _direct(nc, "exo.events.runner.a")
    middle: list[Envelope] = []
    assert await client.replay(nc, middle.append, start_seq=10, end_seq=20) == 20
    assert [e.seq for e in middle] == list(range(10, 21))
    # Past the end of the stream: everything there is, then done; an empty range reads nothing.
    tail: list[Envelope] = []
    assert await client.replay(nc, tail.append, start_seq=n - 1, end_seq=n + 50) == n
    assert [e.seq for e in tail] == [n - 1, n]
    assert await client.replay(nc, tail.append, start_seq=n + 1) == 0


async def test_async_handlers_and_handler_errors(nc: NATS) -> None:
    await _fill(nc, 10)
    seen: list[int] = []

    async def slow(env: Envelope) -> None:
        await asyncio.sleep(0)
        seen.append(env.seq)

    assert await client.replay(nc, slow) == 10
    assert seen == list(range(1, 11))

    def failing(env: Envelope) -> None:
        if env.seq == 4:
            raise ValueError("handler broke at 4")

    with pytest.raises(ValueError, match="handler broke at 4"):
        await client.replay(nc, failing)
    # Nothing is left behind on the server: the read's consumer is deleted.
    info = await nc.jetstream().stream_info(streams.LOG_STREAM)
    assert info.state.consumer_count == 0


async def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_connection_cut_mid_read_resumes_without_gap_or_repeat(nats_server: NatsServer, nc: NATS) -> None:
    n = 3000
    await _fill(nc, n)
    proxy = NatsProxy(nats_server.port)
    proxy.cut_after(20_000)  # a few hundred messages into the read
    proxied = await client.connect(await proxy.start(), name="through-proxy")
    try:
        got: list[Envelope] = []
        assert await client.replay(proxied, got.append) == n
        assert proxy.connections >= 2  # the cut connection was replaced
        assert [e.seq for e in got] == list(range(1, n + 1))
    finally:
        await proxied.close()
        proxy.close()


async def test_live_follow_survives_a_server_restart_and_resumes_at_once(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = NatsServer(port=0, monitor_port=0, store_dir=store).start()
    nc = await client.connect(server.url, name="follower")
    try:
        await stream_setup.ensure_streams(nc.jetstream())
        await _fill(nc, 50)
        got: list[int] = []
        follower = await client.follow(nc, lambda env: got.append(env.seq))
        await _until(lambda: len(got) == 50, 10, "the first 50")
        server.kill()
        server = NatsServer(port=server.port, monitor_port=0, store_dir=store).start()
        await _until(lambda: client.watch(nc).connected, 15, "the reconnect")
        back = time.monotonic()
        writer = await client.connect(server.url, name="writer")
        await _fill(writer, 50, start=50)
        await writer.close()
        await _until(lambda: len(got) == 100, 10, "the 50 written after the restart")
        assert time.monotonic() - back < 2.5, "live follow did not resume within 2 s of the reconnect"
        assert got == list(range(1, 101))
        assert client.watch(nc).outages == 1
        await follower.stop()
    finally:
        await nc.close()
        server.stop()
