"""A chat's chunks reach a reader two ways (a core subscription as published, EXO_CHUNKS once
stored): whatever the interleaving, and whatever the core subscription missed, the text comes
out whole, in order, each chunk once."""

from __future__ import annotations

import asyncio

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.nats.chunk_order import ChunkOrder, read_chunks


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
    out: list[str] = []
    order = ChunkOrder(out.append)
    for index, text in arrivals:
        order.offer(index, text)
    assert "".join(out) == "".join(texts)
    assert order.next_index == len(texts)


def test_a_chunk_ahead_waits_for_the_one_before() -> None:
    out: list[str] = []
    order = ChunkOrder(out.append)
    order.offer(1, "b")
    assert out == []
    order.offer(0, "a")
    order.offer(0, "a")
    order.offer(1, "b")
    assert out == ["a", "b"]


async def test_a_reader_gets_what_was_stored_before_it_and_what_comes_after_once(nc: NATS) -> None:
    js = nc.jetstream()
    subject = subjects.chunks_subject("r1", "chat-order")

    async def publish(index: int, text: str) -> None:
        await js.publish(subject, msgspec.json.encode({"task_id": "t", "index": index, "text": text}))

    # Stored before the reader came: only the stream has them.
    await publish(0, "a")
    await publish(1, "b")
    texts: asyncio.Queue[str] = asyncio.Queue()
    subs = await read_chunks(nc, subject, texts.put_nowait)
    try:
        # From now on each comes both ways; a message that is no chunk is passed over.
        await js.publish(subject, b"not json")
        for index, text in enumerate("cd!", start=2):
            await publish(index, text)
        said = ""
        async with asyncio.timeout(10):
            while not said.endswith("!"):
                said += await texts.get()
        assert said == "abcd!"
    finally:
        for sub in subs:
            await sub.unsubscribe()
