"""A chat's chunks reach the API two ways (a core subscription as published, EXO_CHUNKS once
stored): whatever the interleaving, and whatever the core subscription missed, the text comes
out whole, in order, each chunk once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exojet.api.gateway import ChatStream, Chunk, Lost


def _read(stream: ChatStream) -> str:
    text = []
    while not stream.items.empty():
        item = stream.items.get_nowait()
        assert isinstance(item, Chunk)
        text.append(item.text)
    return "".join(text)


@st.composite
def _deliveries(draw: st.DrawFn) -> tuple[list[str], list[tuple[int, str]]]:
    texts = draw(st.lists(st.text(max_size=3), max_size=12))
    chunks = list(enumerate(texts))
    # The core subscription: in publish order, any of them lost (a reconnect, a slow consumer).
    fast = [c for c in chunks if draw(st.booleans())]
    # The stream: every chunk, in order. The two arrive interleaved in any way.
    order = draw(st.permutations([0] * len(fast) + [1] * len(chunks)))
    sources = [list(fast), list(chunks)]
    return texts, [sources[way].pop(0) for way in order]


@given(_deliveries())
def test_every_interleaving_gives_the_whole_text_once(delivery: tuple[list[str], list[tuple[int, str]]]) -> None:
    texts, arrivals = delivery
    stream = ChatStream("c", "c")
    for index, text in arrivals:
        stream.offer(index, text)
    assert _read(stream) == "".join(texts)
    assert stream.next_index == len(texts)


def test_a_chunk_ahead_waits_for_the_one_before_and_nothing_comes_after_the_end() -> None:
    stream = ChatStream("c", "c")
    stream.offer(1, "b")
    assert stream.items.empty()
    stream.offer(0, "a")
    stream.offer(0, "a")
    assert _read(stream) == "ab"
    stream.end(Lost("gone"))
    stream.offer(2, "c")
    assert isinstance(stream.items.get_nowait(), Lost)
    assert stream.items.empty()
