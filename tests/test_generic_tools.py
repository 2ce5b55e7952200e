"""runner/generic_tools.py: the generic tool path's schema, prompt and answer reading (pure)."""

from __future__ import annotations

import json

import jsonschema_rs

from exojet.bus.tools import (
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    join_deltas,
    missing_pieces,
    wanted_tools,
)
from exojet.runner import generic_tools

ADD = Tool(
    type="function",
    function=FunctionDef(name="add", parameters={"type": "object", "properties": {"a": {"type": "integer"}}}),
)
NOW = Tool(type="function", function=FunctionDef(name="now"))


def test_the_schema_takes_calls_of_the_tools_only_and_words_unless_required() -> None:
    free = jsonschema_rs.validator_for(generic_tools.calls_schema((ADD, NOW), required=False, parallel=True))
    required = jsonschema_rs.validator_for(generic_tools.calls_schema((ADD, NOW), required=True, parallel=False))
    two = {"tool_calls": [{"name": "add", "arguments": {"a": 1}}, {"name": "now", "arguments": {}}]}

    assert free.is_valid(two) and free.is_valid({"response": "hi"})
    assert not required.is_valid({"response": "hi"})
    assert not required.is_valid(two)  # one call only without parallel_tool_calls
    assert required.is_valid({"tool_calls": [{"name": "now", "arguments": {}}]})
    assert not free.is_valid({"tool_calls": [{"name": "rm", "arguments": {}}]})
    assert not free.is_valid({"tool_calls": [{"name": "add", "arguments": {"a": "x"}}]})


def test_an_answer_is_read_into_calls_or_words() -> None:
    text, calls = generic_tools.read_answer('{"tool_calls":[{"name":"add","arguments":{"a":2}}]}', "c")
    assert text == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [("c-0", "add", {"a": 2})]
    assert generic_tools.read_answer('{"response":"hello"}', "c") == ("hello", [])
    # Cut short by max_tokens: the text as it is, no call.
    assert generic_tools.read_answer('{"tool_calls":[{"na', "c") == ('{"tool_calls":[{"na', [])


def test_tool_choice_picks_the_tools_and_deltas_join() -> None:
    named = NamedToolChoice(type="function", function=FunctionName(name="now"))
    assert wanted_tools((ADD, NOW), named) == (NOW,)
    assert wanted_tools((ADD, NOW), "none") == ()
    assert generic_tools.uses_generic(True, named) and generic_tools.uses_generic(False, "auto")
    assert not generic_tools.uses_generic(True, "auto")
    pieces = [
        ToolCallDelta(index=0, id="a", name="add"),
        ToolCallDelta(index=1, id="b", name="now", arguments="{}"),
        ToolCallDelta(index=0, arguments='{"a":'),
        ToolCallDelta(index=0, arguments="1}"),
    ]
    assert [(c.id, c.name, c.arguments) for c in join_deltas(pieces)] == [("a", "add", '{"a":1}'), ("b", "now", "{}")]


def test_the_pieces_a_reader_missed_are_made_up_from_the_whole_calls() -> None:
    calls = (ToolCall(id="a", name="add", arguments='{"a":1}'), ToolCall(id="b", name="now", arguments="{}"))
    seen = [ToolCallDelta(index=0, id="a", name="add", arguments='{"a":')]
    rest = missing_pieces(seen, calls)
    assert rest == [ToolCallDelta(index=0, arguments="1}"), ToolCallDelta(index=1, id="b", name="now", arguments="{}")]
    assert join_deltas(seen + rest) == list(calls)
    assert missing_pieces(seen + rest, calls) == []
