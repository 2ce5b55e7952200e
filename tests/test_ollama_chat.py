"""Ollama's tool calls and results as the routed chat takes them, and its answer's calls as Ollama
gives them (api/ollama_chat.py, pure): ids given to calls without one, each result tied to the call
it answers, a streamed call whole once its pieces are all in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from exojet.api.dialect_base import CallPiece
from exojet.api.errors import ApiError
from exojet.api.ollama_chat import Message, Said, call_json, chat_messages, done_reason, whole_calls
from exojet.bus.chat_ends import Ended
from exojet.bus.results import ChatResult
from exojet.bus.tools import ToolCall, ToolCallDelta


def _messages(raw: list[dict[str, object]]) -> list[Message]:
    return msgspec.convert(raw, list[Message])


def test_calls_get_ids_and_each_result_answers_its_call() -> None:
    calls = [
        {"function": {"name": "clock", "arguments": {}}},
        {"id": "mine", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
        {"function": {"name": "weather", "arguments": {"city": "Rome"}}},
    ]
    history = _messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "content": "rain", "tool_name": "weather"},  # the first weather call unanswered
            {"role": "tool", "content": "noon"},  # no name: the first call unanswered
            {"role": "tool", "content": "sun", "tool_call_id": "call_1_2"},  # named by id
            {"role": "tool", "content": "late", "tool_name": "clock"},  # none left of that name
            {"role": "tool", "content": "again"},  # every call answered
        ]
    )
    routed = chat_messages(history)
    assert [(c.id, c.name, c.arguments) for c in routed[1].tool_calls] == [
        ("call_1_0", "clock", "{}"),
        ("mine", "weather", '{"city":"Oslo"}'),
        ("call_1_2", "weather", '{"city":"Rome"}'),
    ]
    assert [m.tool_call_id for m in routed[2:]] == ["mine", "call_1_0", "call_1_2", None, None]
    assert [m.role for m in routed] == ["user", "assistant", "tool", "tool", "tool", "tool", "tool"]


def test_a_call_is_an_object_of_arguments_or_is_dropped() -> None:
    assert call_json(1, ToolCall(id="c", name="f", arguments='{"a": [1]}')) == {
        "id": "c",
        "function": {"index": 1, "name": "f", "arguments": {"a": [1]}},
    }
    assert call_json(0, ToolCall(id="c", name="f", arguments='{"a": ')) is None  # cut short
    assert call_json(0, ToolCall(id="c", name="f", arguments="[1]")) is None
    assert done_reason("tool_calls") == "stop" and done_reason("length") == "length"


async def _said(pieces: list[CallPiece]) -> list[Said]:
    async def source() -> AsyncIterator[CallPiece]:
        for piece in pieces:
            yield piece

    return [s async for s in whole_calls(source())]


async def test_streamed_calls_come_whole_once_their_pieces_are_in() -> None:
    ended = Ended(ChatResult(finish_reason="tool_calls"))
    pieces: list[CallPiece] = [
        "let me see",
        ToolCallDelta(index=0, id="a", name="f", arguments='{"x"'),
        ToolCallDelta(index=0, arguments=": 1}"),
        ToolCallDelta(index=1, id="b", name="g", arguments="{}"),
        ended,
    ]
    assert await _said(pieces) == [
        "let me see",
        {"id": "a", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}},
        {"id": "b", "function": {"index": 1, "name": "g", "arguments": {}}},
        ended,
    ]
    failed = ApiError(500, "lost")
    cut = ToolCallDelta(index=1, id="b", name="g", arguments='{"y": ')  # cut short: dropped
    assert await _said([ToolCallDelta(index=0, id="a", name="f", arguments="{}"), cut, failed]) == [
        {"id": "a", "function": {"index": 0, "name": "f", "arguments": {}}},
        failed,
    ]
