"""Anthropic's streamed content blocks build what the whole message says, for any answer of text and
tool calls in fragments: the generic tool path of the test models sends each call whole, so the
shapes a template's own tool syntax streams (words, then calls in argument fragments) are drawn
here, through the same functions the route answers with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import given

from exojet.api import dialect_anthropic
from exojet.api.chat_request import ChatRequest
from exojet.api.dialect_base import CallPiece
from exojet.bus.chat_ends import Ended
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import AnswerShape, FunctionDef, Tool
from tests.tool_answers import answers

TOOL = Tool(type="function", function=FunctionDef(name="get_weather", parameters={"type": "object"}))
REQUEST = ChatRequest(
    model="local/tiny",
    messages=(ChatMessage("user", "weather?"),),
    stream=True,
    include_usage=True,
    sampling=Sampling(max_tokens=64),
    shape=AnswerShape(tools=(TOOL,)),
)


def _events(pieces: list[CallPiece], end: Ended) -> list[dict[str, Any]]:
    async def source() -> AsyncIterator[CallPiece]:
        for piece in [*pieces, end]:
            yield piece

    async def read() -> list[bytes]:
        return [part async for part in dialect_anthropic._events("chat-1", REQUEST, source())]

    return [json.loads(part.split(b"data: ", 1)[1]) for part in asyncio.run(read())]


def _built(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content the events build, as a client builds it, holding Anthropic's order: one block
    open at a time, started before its deltas and stopped before the next starts."""
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    open_at = None
    for e in events:
        if e["type"] == "content_block_start":
            assert open_at is None and e["index"] == len(blocks)
            open_at = e["index"]
            blocks.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_at
            delta = e["delta"]
            if delta["type"] == "text_delta":
                blocks[open_at]["text"] += delta["text"]
            else:
                partial[open_at] = partial.get(open_at, "") + delta["partial_json"]
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_at
            if open_at in partial:
                blocks[open_at]["input"] = json.loads(partial[open_at])
            open_at = None
    assert open_at is None
    return blocks


@given(answers())
def test_the_streamed_blocks_build_the_whole_messages_content(answer: tuple[list[CallPiece], Ended]) -> None:
    pieces, end = answer
    events = _events(pieces, end)
    assert [e["type"] for e in events[:2]] == ["message_start", "ping"]
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    said = [p for p in pieces if isinstance(p, str)]
    whole = dialect_anthropic._message("chat-1", REQUEST, list(said), end)
    assert _built(events) == whole["content"]
    assert events[-2]["delta"]["stop_reason"] == whole["stop_reason"]
    assert whole["stop_reason"] == ("tool_use" if end.result.tool_calls else "end_turn")
    for block in whole["content"]:
        if block["type"] == "tool_use":
            assert block["id"].startswith("toolu_") and "." not in block["id"]
