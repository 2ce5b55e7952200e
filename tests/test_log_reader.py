"""bus/log_reader.py: the plain-protocol batch reader catch-up uses, against a real nats-server."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from exojet.bus import client, log_reader, streams
from exojet.bus.envelope import Envelope, parse_ack_reply
from exojet.bus.log_reader import Frame, parse_frames
from exojet.bus.server import NatsServer

pytestmark = pytest.mark.timeout(120)

_token = st.text("abcdefghij0123456789_-", min_size=1, max_size=12)
_subject = st.lists(_token, min_size=1, max_size=4).map(".".join).map(str.encode)
_frame = st.one_of(
    st.tuples(
        _subject,
        st.none() | _subject,
        st.none() | st.binary(min_size=1).map(lambda b: b"NATS/1.0\r\n" + b),
        st.binary(max_size=300),
    ),
    st.sampled_from([b"PING", b"PONG", b"+OK", b'INFO {"server_id":"x"}']).map(lambda line: (line, None, None, None)),
)


def _wire(frame: Frame) -> bytes:
    subject, reply, headers, payload = frame
    if payload is None:
        return subject + b"\r\n"
    middle = b" " + reply if reply is not None else b""
    if headers is None:
        return b"MSG %s 1%s %d\r\n%s\r\n" % (subject, middle, len(payload), payload)
    return b"HMSG %s 1%s %d %d\r\n%s%s\r\n" % (
        subject,
        middle,
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


@given(st.lists(_frame, max_size=30), st.lists(st.integers(1, 400), min_size=1, max_size=50))
def test_frames_parse_alike_however_the_bytes_are_cut(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(_wire(f) for f in frames)
    parsed: list[Frame] = []
    carry, at, i = b"", 0, 0
    while at < len(wire):
        chunk = wire[at : at + cuts[i % len(cuts)]]
        at, i = at + len(chunk), i + 1
        buf = carry + chunk
        carry = buf[parse_frames(buf, 0, parsed) :]
    assert carry == b""
    assert parsed == frames


def test_ack_reply_both_forms() -> None:
    assert parse_ack_reply("$JS.ACK.EXO_LOG.c1.1.42.7.1700000000000000000.3") == (42, 7, 1700000000000000000)
    assert parse_ack_reply("$JS.ACK.dom.acchash.EXO_LOG.c1.1.42.7.1700000000000000000.3.tok") == (
        42,
        7,
        1700000000000000000,
    )


async def _fill(nc: NATS, n: int) -> None:
    js = nc.jetstream()
    acks = []
    for i in range(n):
        # Headers on some (as fenced writes carry), CRLF inside payloads, two subjects.
        headers = {"Nats-Msg-Id": f"m{i}"} if i % 3 == 0 else None
        subject = "exo.events.runner.a" if i % 2 else "exo.events.runner.b"
        acks.append(await js.publish_async(subject, f'{{"i":{i},"x":"\r\n"}}'.encode(), headers=headers))
    await asyncio.gather(*acks)


async def _ordered(nc: NATS, subject: str = ">") -> list[Envelope]:
    """The same messages through nats-py's ordered consumer (client.follow)."""
    last = await client.last_seq(nc.jetstream())
    seen: list[Envelope] = []
    done = asyncio.get_running_loop().create_future()

    def on_env(env: Envelope) -> None:
        seen.append(env)
        if env.seq == last and not done.done():
            done.set_result(None)

    sub = await client.follow(nc.jetstream(), on_env, subject=subject)
    await asyncio.wait_for(done, 60)
    await sub.unsubscribe()
    return seen if subject == ">" else [e for e in seen if e.subject == subject]


async def test_reads_every_batch_like_the_ordered_consumer(nc: NATS) -> None:
    n = 2 * log_reader.BATCH + 500
    await _fill(nc, n)
    got: list[Envelope] = []
    last = await log_reader.read_range(nc.jetstream(), streams.LOG_STREAM, got.append, 1, n)
    assert last == n
    assert got == await _ordered(nc)


async def test_a_subject_and_a_sub_range(nc: NATS) -> None:
    n = log_reader.BATCH + 100
    await _fill(nc, n)
    js = nc.jetstream()
    on_a: list[Envelope] = []
    assert await client.replay_subject(js, "exo.events.runner.a", on_a.append) == n
    assert on_a == await _ordered(nc, "exo.events.runner.a")
    middle: list[Envelope] = []
    assert await log_reader.read_range(js, streams.LOG_STREAM, middle.append, 10, 20) == 20
    assert [e.seq for e in middle] == list(range(10, 21))
    # Past the end of the stream: everything there is, then done.
    tail: list[Envelope] = []
    assert await log_reader.read_range(js, streams.LOG_STREAM, tail.append, n - 1, n + 50) == n
    assert [e.seq for e in tail] == [n - 1, n]


async def test_async_handlers_and_handler_errors(nc: NATS) -> None:
    await _fill(nc, 10)
    js = nc.jetstream()
    seen: list[int] = []

    async def slow(env: Envelope) -> None:
        await asyncio.sleep(0)
        seen.append(env.seq)

    assert await log_reader.read_range(js, streams.LOG_STREAM, slow, 1, 10) == 10
    assert seen == list(range(1, 11))

    def failing(env: Envelope) -> None:
        if env.seq == 4:
            raise ValueError("handler broke at 4")

    with pytest.raises(ValueError, match="handler broke at 4"):
        await log_reader.read_range(js, streams.LOG_STREAM, failing, 1, 10)
    # Nothing is left behind on the server: the read's consumer is deleted.
    info = await js.stream_info(streams.LOG_STREAM)
    assert info.state.consumer_count == 0


class _CuttingProxy:
    """A TCP proxy to nats-server that cuts its `cut_connection`-th connection after `cut_after` bytes."""

    def __init__(self, target_port: int, cut_connection: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_connection = cut_connection
        self.cut_after = cut_after
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.connections = self.connections, self.connections + 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        budget = self.cut_after if index == self.cut_connection else None

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limited: bool) -> None:
            nonlocal budget
            while data := await src.read(65536):
                if limited and budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                dst.write(data)
                await dst.drain()
                if limited and budget == 0:
                    break
            writer.close()
            up_writer.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True)

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_connection_cut_mid_batch_resumes_without_gap_or_repeat(nats_server: NatsServer, nc: NATS) -> None:
    n = log_reader.BATCH + 300
    await _fill(nc, n)
    # Connection 0 is nats-py's; connection 1 is the reader's first, cut ~100 messages in.
    proxy = _CuttingProxy(nats_server.port, cut_connection=1, cut_after=10_000)
    proxied = await client.connect(await proxy.start(), name="through-proxy")
    try:
        got: list[Envelope] = []
        assert await log_reader.read_range(proxied.jetstream(), streams.LOG_STREAM, got.append, 1, n) == n
        assert proxy.connections >= 3  # the cut connection was replaced
        assert [e.seq for e in got] == list(range(1, n + 1))
        assert got == await _ordered(nc)
    finally:
        await proxied.close()
        proxy.close()
