"""A chat session's reading of a chat: its chunks in order (see tests/test_chunk_order.py for every
way they may come), and nothing after its end."""

from __future__ import annotations

from exojet.bus.chat_ends import ChatLost
from exojet.bus.nats.chat_stream import ChatStream


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
