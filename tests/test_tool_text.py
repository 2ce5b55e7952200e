"""A model's own tool syntax read from its streamed text (runner/tool_text.py, runner/answer_stream.py)
with mlx-lm's own parser: words apart from calls however the text is split, calls as typed pieces."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.tool_parsers import json_tools

from exojet.bus.tools import ToolCallDelta, join_deltas
from exojet.runner.answer_plan import AnswerPlan
from exojet.runner.answer_stream import AnswerStream, ToolSyntax
from exojet.runner.engine_protocol import Message
from exojet.runner.tool_text import ToolTextScanner
from tests.engine_contract import CLOCK, WEATHER

SYNTAX = ToolSyntax(json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
TEXT = (
    f"Let me look.<tool_call>\n{CALL}\n</tool_call><tool_call>"
    + '{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=12))
def test_words_and_calls_are_the_same_however_the_text_is_split(cuts: list[int]) -> None:
    scanner = ToolTextScanner(SYNTAX.start, SYNTAX.end)
    words, calls = "", []
    for a, b in itertools.pairwise([0, *sorted(cuts), len(TEXT)]):
        w, c = scanner.feed(TEXT[a:b])
        words, calls = words + w, calls + c
        # Nothing of a marker is ever sent as words.
        assert "<" not in words
    w, c = scanner.flush()
    assert (words + w, [json.loads(t) for t in calls + c]) == (
        "Let me look.",
        [json.loads(CALL), {"name": "get_time", "arguments": {"zone": "CET"}}],
    )


def test_text_like_a_marker_that_is_not_one_is_sent_at_its_end() -> None:
    scanner = ToolTextScanner(SYNTAX.start, SYNTAX.end)
    assert scanner.feed("a <tool") == ("a ", [])
    assert scanner.feed("box>") == ("<toolbox>", [])
    assert scanner.feed(" <tool") == (" ", [])
    assert scanner.flush() == ("<tool", [])
    assert scanner.words == "a <toolbox> <tool"


def test_an_answer_in_the_models_tool_syntax_becomes_typed_pieces_and_calls() -> None:
    sent: list[str | ToolCallDelta] = []
    plan = AnswerPlan(messages=(Message(role="user", content="hi"),), template_tools=(WEATHER, CLOCK))
    answer = AnswerStream(plan, [], sent.append, "call-1", SYNTAX)
    for i in range(0, len(TEXT), 5):
        assert not answer.feed(TEXT[i : i + 5])
    # A call cut short by max_tokens does not parse: it is dropped, as mlx-lm's server drops it.
    answer.feed("<tool_call>{")

    words, calls = answer.finish()

    assert words == "Let me look." == "".join(s for s in sent if isinstance(s, str))
    pieces = [s for s in sent if isinstance(s, ToolCallDelta)]
    assert [p.index for p in pieces] == [0, 1]
    assert join_deltas(pieces) == list(calls)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call-1-0", "get_weather", {"city": "Paris", "days": 2}),
        ("call-1-1", "get_time", {"zone": "CET"}),
    ]


def test_without_parallel_calls_the_first_call_alone_is_made() -> None:
    sent: list[str | ToolCallDelta] = []
    plan = AnswerPlan(messages=(), template_tools=(WEATHER, CLOCK))
    answer = AnswerStream(plan, [], sent.append, "c", SYNTAX, parallel=False)
    answer.feed(TEXT)

    _, calls = answer.finish()

    assert [c.name for c in calls] == ["get_weather"]
    assert join_deltas([s for s in sent if isinstance(s, ToolCallDelta)]) == list(calls)


def test_without_template_tools_the_syntax_is_plain_text() -> None:
    sent: list[str | ToolCallDelta] = []
    answer = AnswerStream(AnswerPlan(messages=()), ["</tool"], sent.append, "c", SYNTAX)
    assert answer.feed("x<tool_call>y</tool_call>z")
    assert answer.finish() == ("x<tool_call>y", ())
    assert sent == ["x<tool_call>y"]
