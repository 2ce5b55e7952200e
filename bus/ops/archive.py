"""Log archives: a range of `EXO_LOG` as gzip-compressed JSON lines, read back as the stream reads.

One line a message, `{"seq", "subject", "time", "data"}`: `data` is the message's
bytes as text when they are UTF-8 (every message exojet writes), else
`"data_b64"` holds them in base64, so a malformed message is archived exactly as
the log holds it and replays to the same anomaly.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from exojet.bus.envelope import Envelope


class ArchiveError(ValueError):
    """The file is not a log archive this version can read (names the line)."""


class _Line(msgspec.Struct, kw_only=True):
    seq: int
    subject: str
    time: float = 0.0
    data: str | None = None
    data_b64: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Line)


class ArchiveWriter:
    """Append envelopes, in sequence order, to a gzip JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self._file = gzip.GzipFile(path, "wb", compresslevel=6)
        self.count = 0
        self.first_seq = 0
        self.last_seq = 0

    def write(self, env: Envelope) -> None:
        try:
            line = _Line(seq=env.seq, subject=env.subject, time=env.time, data=env.data.decode())
        except UnicodeDecodeError:
            line = _Line(seq=env.seq, subject=env.subject, time=env.time, data_b64=base64.b64encode(env.data).decode())
        self._file.write(_encoder.encode(line) + b"\n")
        self.count += 1
        self.first_seq = self.first_seq or env.seq
        self.last_seq = env.seq

    def close(self) -> None:
        self._file.close()


def read_archive(path: Path, start_seq: int = 1, end_seq: int | None = None) -> Iterator[Envelope]:
    """The archive's messages from `start_seq` to `end_seq` (inclusive), as the stream gives them."""
    try:
        with gzip.open(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                line = _decode(raw, path, number)
                if line.seq < start_seq:
                    continue
                if end_seq is not None and line.seq > end_seq:
                    return
                data = line.data.encode() if line.data is not None else base64.b64decode(line.data_b64 or "")
                yield Envelope(seq=line.seq, subject=line.subject, data=data, time=line.time)
    except (OSError, EOFError) as err:
        raise ArchiveError(f"{path}: not a readable gzip archive ({err})") from None


def _decode(raw: bytes, path: Path, number: int) -> _Line:
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ArchiveError(f"{path} line {number}: {err}") from None


def replay_archive(
    path: Path, handler: Callable[[Envelope], object], start_seq: int = 1, end_seq: int | None = None
) -> int:
    """Feed the archive's messages to `handler` (as `client.replay` does); returns the last seq."""
    last = 0
    for env in read_archive(path, start_seq, end_seq):
        handler(env)
        last = env.seq
    return last
