"""Read a closed range of a stream fast: batched pulls over a connection of our own.

A supervisor restart and `exojet replay` spend their time reading the log, and
through nats-py that costs about 4 µs a message before we look at it (a regex
parser, an awaited `_process_msg`, a `Msg`, a queue): more than decoding and
folding the message. Here an ephemeral pull consumer (created through nats-py)
sends batches to an inbox on a plain NATS protocol connection whose frames
we cut out of each read in one loop. Live following stays on nats-py's ordered
consumer (`client.follow`): this is for catching up.

Protocol: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import ParseResult

import msgspec
from loguru import logger
from nats.js import JetStreamContext, api

from exojet.bus import connect_options, handshake
from exojet.bus.connect_options import ConnectOptions
from exojet.bus.envelope import Envelope, parse_ack_reply

Handler = Callable[[Envelope], Awaitable[None] | None]

BATCH = 2000
# Bounds what one batch can put on the wire (a message may be up to 8 MB).
MAX_BATCH_BYTES = 32 * 1024 * 1024
READ_CHUNK = 1024 * 1024
# With the whole range already stored, a silent server this long means the
# read lost its way: start over from the last message handled.
IDLE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
# Resumes in a row that read nothing before the read gives up.
MAX_FRUITLESS_RESUMES = 3

# A frame: (subject, reply, headers, payload); a control line: (line, None, None, None).
Frame = tuple[bytes, bytes | None, bytes | None, bytes | None]


class LogReadError(ConnectionError):
    """The log could not be read (the server refused us, or spoke something else)."""


class _Resume(Exception):
    """The read lost its place (a gap, a lost request, a dropped connection): resume after the last message handled."""


def parse_frames(buf: bytes, pos: int, out: list[Frame]) -> int:
    """Append the complete frames in `buf[pos:]` to `out`; return where the first incomplete one starts.

    `MSG <subject> <sid> [reply] <size>` and `HMSG <subject> <sid> [reply]
    <header size> <total size>` become (subject, reply, headers, payload);
    any other line (PING, PONG, +OK, -ERR, INFO) is passed on as (line, None, None, None).
    """
    size = len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return pos
        line = buf[pos:eol]
        if line.startswith(b"MSG "):
            parts = line.split(b" ")
            total, header_size, reply = int(parts[-1]), 0, parts[3] if len(parts) == 5 else None
        elif line.startswith(b"HMSG "):
            parts = line.split(b" ")
            total, header_size, reply = int(parts[-1]), int(parts[-2]), parts[3] if len(parts) == 6 else None
        else:
            out.append((line, None, None, None))
            pos = eol + 2
            continue
        start = eol + 2
        end = start + total
        if end + 2 > size:
            return pos
        out.append(
            (parts[1], reply, buf[start : start + header_size] if header_size else None, buf[start + header_size : end])
        )
        pos = end + 2


class _Connection:
    """Just enough of a NATS client to subscribe an inbox and ask a pull consumer for batches."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""

    @classmethod
    async def open(cls, url: ParseResult, options: ConnectOptions) -> _Connection:
        """Connect and authenticate as the nats-py connection beside it did (same key, same TLS trust)."""
        try:
            reader, writer = await handshake.open_connection(url, options, "exojet-log-reader", CONNECT_TIMEOUT_S)
        except (handshake.NatsUnreachable, handshake.NatsRefused) as err:
            raise LogReadError(str(err)) from None
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frames(self, out: list[Frame], timeout: float) -> None:
        """Wait for more bytes and append the frames they complete."""
        try:
            chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
        except TimeoutError:
            raise _Resume(f"nothing from the server for {timeout:.0f} s") from None
        except OSError as err:
            raise _Resume(f"connection lost: {err!r}") from None
        if not chunk:
            raise _Resume("the server closed the connection")
        buf = self.buf + chunk if self.buf else chunk
        pos = parse_frames(buf, 0, out)
        self.buf = buf[pos:]

    def close(self) -> None:
        self.writer.close()


async def read_range(
    js: JetStreamContext,
    stream: str,
    handler: Handler,
    start_seq: int,
    end_seq: int,
    *,
    subject: str = ">",
    timeout: float = 600.0,
) -> int:
    """Call `handler` for every message of `stream` on `subject` with a sequence in
    [start_seq, end_seq], in order, each once; return the last sequence handled (0 if none).

    Gap-free: every message carries its consumer sequence, and a jump, a lost
    request or a dropped connection resumes right after the last message
    handled. Raises TimeoutError when the range is not read within `timeout` s
    and LogReadError when the server refuses the reader; an exception from
    `handler` stops the read and is raised here.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    position = _Position(start_seq)
    fruitless = 0
    while position.next_seq <= end_seq:
        if loop.time() >= deadline:
            raise TimeoutError(
                f"log read did not reach seq {end_seq} within {timeout} s (next seq {position.next_seq})"
            )
        before = position.next_seq
        try:
            if await _pull(js, stream, handler, position, end_seq, subject, deadline):
                break
        except _Resume as why:
            fruitless = 0 if position.next_seq > before else fruitless + 1
            if fruitless == MAX_FRUITLESS_RESUMES:
                raise LogReadError(f"log read stuck at seq {position.next_seq}: {why}") from None
            logger.bind(stream=stream, seq=position.next_seq).warning(
                f"log read resumes at seq {position.next_seq}: {why}"
            )
    # Nothing handled leaves next_seq at start_seq.
    return position.next_seq - 1 if position.next_seq > start_seq else 0


class _Position:
    """Where the read is: the sequence after the last message handled (shared across resumes)."""

    def __init__(self, next_seq: int) -> None:
        self.next_seq = next_seq


async def _pull(
    js: JetStreamContext,
    stream: str,
    handler: Handler,
    position: _Position,
    end_seq: int,
    subject: str,
    deadline: float,
) -> bool:
    """Read from `position` through one consumer and connection; True when the range is exhausted."""
    nc = js._nc  # the JetStream context's connection; nats-py has no public accessor
    url = nc.connected_url
    if url is None:
        raise _Resume("nats-py is not connected")
    info = await js.add_consumer(
        stream,
        api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=position.next_seq,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=None if subject == ">" else subject,
            # Removed by the server if we die mid-read; deleted below otherwise.
            inactive_threshold=30.0,
            # Named, so the filter is part of the API subject (`CONSUMER.CREATE.<stream>.<name>.<filter>`)
            # and a runner's key can be allowed to read its own subjects only.
            name=f"read-{secrets.token_hex(8)}",
            mem_storage=True,
            num_replicas=1,
            description="exojet log read",
        ),
    )
    conn: _Connection | None = None
    try:
        conn = await _Connection.open(url, connect_options.of(nc))
        # Under the connection's own inbox prefix: the only inbox its identity may subscribe.
        inbox = nc.new_inbox()
        request = msgspec.json.encode({"batch": BATCH, "max_bytes": MAX_BATCH_BYTES, "no_wait": True})
        ask = (
            f"PUB {api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{info.name} {inbox} {len(request)}\r\n".encode()
            + request
            + b"\r\n"
        )
        conn.send(f"SUB {inbox} 1\r\n".encode() + ask)
        return await _drain(conn, ask, handler, position, end_seq, deadline)
    finally:
        if conn is not None:
            conn.close()
        try:
            await js.delete_consumer(stream, info.name)
        except Exception as err:  # the inactive threshold removes it anyway
            logger.bind(stream=stream).debug(f"could not delete read consumer {info.name}: {err!r}")


async def _drain(
    conn: _Connection, ask: bytes, handler: Handler, position: _Position, end_seq: int, deadline: float
) -> bool:
    loop = asyncio.get_running_loop()
    expected_cseq = 1
    in_request = 0
    frames: list[Frame] = []
    while True:
        frames.clear()
        await conn.read_frames(frames, max(0.0, min(IDLE_TIMEOUT_S, deadline - loop.time())))
        for subject, reply, headers, payload in frames:
            if payload is None:
                _control(conn, subject)
                continue
            if reply is None:
                # A status ends the pull request: 404 nothing more in range,
                # 408 expired, 409 the batch reached max_bytes.
                status = headers[9:12] if headers else b""
                if status == b"404":
                    return True
                if status in (b"408", b"409"):
                    in_request = 0
                    conn.send(ask)
                    continue
                raise _Resume(f"server status {(headers or b'').strip().decode(errors='replace')}")
            seq, cseq, time_ns = parse_ack_reply(reply.decode())
            if cseq != expected_cseq:
                raise _Resume(f"consumer sequence jumped from {expected_cseq - 1} to {cseq}")
            expected_cseq += 1
            if seq > end_seq:
                return True
            result = handler(Envelope(seq=seq, subject=subject.decode(), data=payload, time=time_ns / 1e9))
            if result is not None:
                await result
            position.next_seq = seq + 1
            if seq == end_seq:
                return True
            in_request += 1
            if in_request == BATCH:
                in_request = 0
                conn.send(ask)


def _control(conn: _Connection, line: bytes) -> None:
    if line == b"PING":
        conn.send(b"PONG\r\n")
    elif line.startswith(b"-ERR"):
        raise LogReadError(f"NATS: {line.decode(errors='replace')}")
