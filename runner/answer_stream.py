"""A generation's text on its way out of an engine that decodes tokens itself (MLX): cut at its
stop strings, its tool calls read in the model's own syntax (mlx-lm's parsers) or, on the generic
path, from the whole JSON answer at its end; words and typed tool-call pieces sent to `emit`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger

from exojet.bus.logprobs import Logprobs
from exojet.bus.tools import ToolCall
from exojet.runner import generic_tools
from exojet.runner.answer_plan import AnswerPlan
from exojet.runner.choice_text import ChoiceText
from exojet.runner.engine_backend import Emit
from exojet.runner.tool_text import ToolTextScanner


class ToolSyntax(msgspec.Struct, frozen=True):
    """A model family's tool calls: the markers around each, and mlx-lm's parser of the text
    between them (text, tools -> a call or a list of calls, each a dict of name and arguments)."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]


class AnswerStream:
    """Takes a generation's text deltas; `finish` gives its words and its tool calls."""

    def __init__(
        self,
        plan: AnswerPlan,
        stop: list[str],
        emit: Emit | None,
        call_id: str,
        syntax: ToolSyntax | None,
        parallel: bool = True,
        choice: int = 0,
    ) -> None:
        self.plan = plan
        # Without parallel calls, the first call alone (as llama.cpp's parser reads one).
        self.max_calls = None if parallel else 1
        # A generic answer is JSON read whole at its end, not text to stream.
        self.answer = ChoiceText([] if plan.generic else stop, choice)
        self.emit = None if plan.generic else emit
        self._emit_end = emit
        self.call_id = call_id
        self.syntax = syntax if plan.template_tools else None
        self.tools = None if self.syntax is None else [msgspec.to_builtins(t) for t in plan.template_tools]
        self.calls_text = None if self.syntax is None else ToolTextScanner(self.syntax.start, self.syntax.end)
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, logprobs: Logprobs = ()) -> bool:
        """Take one delta (and the log-probabilities of the tokens that made it, when asked for);
        True when a stop string ended the answer."""
        out, released, stopped = self.answer.feed(delta, logprobs)
        self._send(out, released)
        return stopped

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """The answer's end: what was held back sent, the words and the calls."""
        tail, released = self.answer.flush()
        if self.plan.generic:
            words, calls = generic_tools.emit_answer(self.answer.text, self.call_id, self._emit_end)
            return words, tuple(calls)
        self._send(tail, released, end=True)
        if self.calls_text is not None:
            return self.calls_text.words, tuple(self.calls)
        return self.answer.text, ()

    def _send(self, text: str, logprobs: Logprobs = (), end: bool = False) -> None:
        if self.calls_text is None:
            if self.emit is not None and (text or logprobs):
                self.emit(self.answer.piece(text, logprobs))
            return
        words, texts = self.calls_text.feed(text)
        if end:
            rest, cut = self.calls_text.flush()
            words, texts = words + rest, texts + cut
        if self.emit is not None and words:
            self.emit(words)
        calls = [c for t in texts for c in self._parse(t)]
        if self.max_calls is not None:
            calls = calls[: max(0, self.max_calls - len(self.calls))]
        generic_tools.emit_calls(calls, self.emit, first=len(self.calls))
        self.calls.extend(calls)

    def _parse(self, text: str) -> list[ToolCall]:
        """The calls in one call's text, numbered on from those before (none if it does not parse,
        as mlx-lm's server drops it: a call cut short by max_tokens)."""
        assert self.syntax is not None
        try:
            parsed = self.syntax.parse(text, self.tools)
            found = parsed if isinstance(parsed, list) else [parsed]
            calls: list[ToolCall] = []
            for c in found:
                args = c["arguments"]
                calls.append(
                    ToolCall(
                        id=f"{self.call_id}-{len(self.calls) + len(calls)}",
                        name=str(c["name"]),
                        arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                    )
                )
            return calls
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("a tool call that does not parse is dropped ({}): {!r}", exc, text[:200])
            return []
