"""The Responses route's pure parts: its streamed output items build what the whole response says,
for any answer of words and tool calls in fragments (the shapes a template's own tool syntax
streams, which the test models' generic path never sends), holding OpenAI's order; and an `input`
of messages, function calls and their outputs is the routed chat's messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import given

from exojet.api import dialect_responses
from exojet.api.dialect_base import CallPiece
from exojet.api.responses_request import parse_responses
from exojet.bus.chat_ends import Ended
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import ToolCall
from tests.tool_answers import answers

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": False}
BODY, _ = parse_responses(json.dumps({"model": "local/tiny", "input": "weather?", "tools": [TOOL]}).encode(), 64)


def _events(pieces: list[CallPiece], end: Ended) -> list[dict[str, Any]]:
    async def source() -> AsyncIterator[CallPiece]:
        for piece in [*pieces, end]:
            yield piece

    async def read() -> list[bytes]:
        shape = dialect_responses.Shape("chat-1", BODY)
        return [part async for part in dialect_responses._events(shape, source())]

    return [json.loads(part.split(b"data: ", 1)[1]) for part in asyncio.run(read())]


def _built(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output the events build, as a client builds it, holding OpenAI's order: one item open at
    a time, added before its deltas and done (with what its deltas built) before the next is added."""
    items: list[dict[str, Any]] = []
    open_at = None
    for e in events:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert open_at is None and e["output_index"] == len(items)
            open_at = e["output_index"]
            items.append(dict(e["item"]))
        elif kind == "response.content_part.added":
            assert e["output_index"] == open_at
            items[open_at]["content"] = [dict(e["part"])]
        elif kind == "response.output_text.delta":
            assert e["output_index"] == open_at and e["item_id"] == items[open_at]["id"]
            items[open_at]["content"][0]["text"] += e["delta"]
        elif kind == "response.function_call_arguments.delta":
            assert e["output_index"] == open_at and e["item_id"] == items[open_at]["id"]
            items[open_at]["arguments"] += e["delta"]
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == items[open_at]["arguments"]
        elif kind == "response.output_text.done":
            assert e["text"] == items[open_at]["content"][0]["text"]
        elif kind == "response.output_item.done":
            assert e["output_index"] == open_at
            built = items[open_at]
            assert e["item"]["id"] == built["id"] and e["item"].get("arguments") == built.get("arguments")
            items[open_at] = e["item"]
            open_at = None
    assert open_at is None
    return items


@given(answers())
def test_the_streamed_items_build_the_whole_responses_output(answer: tuple[list[CallPiece], Ended]) -> None:
    pieces, end = answer
    events = _events(pieces, end)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    said = "".join(p for p in pieces if isinstance(p, str))
    whole = dialect_responses.Shape("chat-1", BODY).ended(said, end)
    assert _built(events) == whole["output"] == events[-1]["response"]["output"]
    calls = [item for item in whole["output"] if item["type"] == "function_call"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        (c.id, c.name, c.arguments) for c in end.result.tool_calls
    ]
    assert all(c["status"] == "completed" and c["id"].startswith("fc_") for c in calls)
    # The message comes first, when the answer said words (and always without calls).
    assert [i["type"] for i in whole["output"]] == ["message"] * bool(said or not calls) + ["function_call"] * len(
        calls
    )


def test_function_calls_and_their_outputs_are_the_chats_assistant_calls_and_tool_messages() -> None:
    items = [
        {"role": "user", "content": "weather in paris and rome?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}"},
    ]
    body = {"model": "local/tiny", "instructions": "be brief", "input": items, "tools": [TOOL]}
    _, req = parse_responses(json.dumps(body).encode(), 64)
    paris = ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
    rome = ToolCall(id="c2", name="get_weather", arguments='{"city": "Rome"}')
    assert req.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "weather in paris and rome?"),
        ChatMessage("assistant", "Checking.", tool_calls=(paris, rome)),
        ChatMessage("tool", "sunny", tool_call_id="c1"),
        ChatMessage("tool", "rain", tool_call_id="c2"),
        ChatMessage("assistant", "", tool_calls=(ToolCall(id="c3", name="get_weather", arguments="{}"),)),
    )
    assert req.shape.tools[0].function.name == "get_weather"
