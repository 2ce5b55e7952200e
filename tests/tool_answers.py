"""Answers of words and tool calls in argument fragments, as a template's own tool syntax streams
them (the test models' generic path sends each call whole): the dialects' stream tests draw them."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from exojet.api.dialect_base import CallPiece
from exojet.bus.chat_ends import Ended
from exojet.bus.results import ChatResult
from exojet.bus.tools import ToolCall, ToolCallDelta

ARGUMENTS = st.dictionaries(st.sampled_from(["city", "days", "unit"]), st.text(max_size=8) | st.integers())


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[CallPiece], Ended]:
    """The pieces of an answer (its words, then each call's id and name with its first fragment,
    then the rest of its arguments) and its end."""
    words = draw(st.lists(st.text(min_size=1, max_size=6), max_size=3))
    calls = [
        ToolCall(id=f"call-{i}.{draw(st.integers(0, 99))}", name="get_weather", arguments=json.dumps(arguments))
        for i, arguments in enumerate(draw(st.lists(ARGUMENTS, max_size=3)))
    ]
    pieces: list[CallPiece] = list(words)
    for index, call in enumerate(calls):
        first, *rest = _split(call.arguments, draw(st.lists(st.integers(0, 60), max_size=4)))
        pieces.append(ToolCallDelta(index=index, id=call.id, name=call.name, arguments=first))
        pieces += [ToolCallDelta(index=index, arguments=fragment) for fragment in rest]
    reason = "tool_calls" if calls else "stop"
    return pieces, Ended(ChatResult(text="".join(words), finish_reason=reason, tool_calls=tuple(calls)))
