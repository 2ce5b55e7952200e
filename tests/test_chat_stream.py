"""A chat session's reading of a chat: its chunks in order (see tests/test_chunk_order.py for every
way they may come), and nothing after its end."""

from __future__ import annotations

import asyncio

import pytest

from exojet.bus.chat_ends import ChatLost, Ended
from exojet.bus.chunks import ChoiceDelta
from exojet.bus.nats import chat_stream
from exojet.bus.nats.chat_stream import CHUNKS_END, ChatStream
from exojet.bus.results import ChatResult


def _read(stream: ChatStream) -> str:
    text = []
    while not stream.items.empty():
        item = stream.items.get_nowait()
        assert isinstance(item, str)
        text.append(item)
    return "".join(text)


def test_a_chunk_ahead_waits_for_the_one_before_and_nothing_comes_after_the_end() -> None:
    stream = ChatStream("c", "c")
    stream.offer(1, "b")
    assert stream.items.empty()
    stream.offer(0, "a")
    stream.offer(0, "a")
    assert _read(stream) == "ab"
    stream.end(ChatLost("c", "gone"))
    stream.offer(2, "c")
    assert isinstance(stream.items.get_nowait(), ChatLost)
    assert stream.items.empty()


async def test_its_end_waits_for_its_closing_chunk_then_comes_after_every_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The Complete status may come before the last chunks (two streams): they carry the tokens'
    # log-probabilities and the further answers, which the result does not.
    stream = ChatStream("c", "c")
    stream.offer(0, "a")
    stream.end(Ended(ChatResult(text="ab")))
    stream.offer(2, CHUNKS_END)
    assert _read(stream) == "a"
    stream.offer(1, ChoiceDelta(choice=1, text="b"))
    assert [stream.items.get_nowait(), stream.items.get_nowait()] == [
        ChoiceDelta(choice=1, text="b"),
        Ended(ChatResult(text="ab")),
    ]
    # A closing chunk that never comes holds the end CHUNKS_GRACE_S at most.
    monkeypatch.setattr(chat_stream, "CHUNKS_GRACE_S", 0.05)
    late = ChatStream("d", "d")
    late.end(Ended(ChatResult(text="x")))
    assert late.items.empty()
    assert await asyncio.wait_for(late.items.get(), 5) == Ended(ChatResult(text="x"))
