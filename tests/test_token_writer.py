"""The engine child's token frames: the first piece at once, the rest at most one frame per
TOKEN_FLUSH_S, further apart while many generations run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from exojet.runner import engine_child
from exojet.runner.engine_child import TokenWriter
from exojet.runner.engine_pipe import Pipe


@pytest.fixture
def pipe() -> Iterator[tuple[Pipe, int]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    yield Pipe(read_fd, write_fd), read_fd
    os.close(read_fd)
    os.close(write_fd)


def _frames(read_fd: int) -> bytes:
    try:
        return os.read(read_fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_the_first_piece_goes_at_once_and_the_next_waits_for_the_interval(
    pipe: tuple[Pipe, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_child, "TOKEN_FLUSH_S", 60.0)  # no machine is that slow between two lines
    writer, read_fd = TokenWriter(pipe[0]), pipe[1]
    writer.write("Hello")
    assert b"Hello" in _frames(read_fd)
    writer.write(" world")
    assert _frames(read_fd) == b""  # held: the last frame went out less than TOKEN_FLUSH_S ago
    writer.flush()
    assert b" world" in _frames(read_fd)


def test_nothing_is_written_without_a_stream() -> None:
    writer = TokenWriter(None)
    writer.write("a")
    assert writer.written_at is None


def test_many_streams_at_once_write_no_more_frames_in_all_than_two_would() -> None:
    assert engine_child.flush_interval(0) == engine_child.flush_interval(2) == engine_child.TOKEN_FLUSH_S
    for generations in (4, 8, 16, 32):
        frames_per_s = generations / engine_child.flush_interval(generations)
        assert frames_per_s == pytest.approx(engine_child.MAX_FRAMES_PER_S)


def test_a_stream_waits_the_interval_it_is_given_now(pipe: tuple[Pipe, int]) -> None:
    interval = [0.0]
    writer, read_fd = TokenWriter(pipe[0], interval=lambda: interval[0]), pipe[1]
    writer.write("a")
    writer.write("b")
    assert _frames(read_fd).count(b"Token") == 2  # no interval: each piece its own frame
    interval[0] = 60.0  # many streams started meanwhile
    writer.write("c")
    assert _frames(read_fd) == b""
