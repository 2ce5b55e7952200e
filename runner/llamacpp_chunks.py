"""llama.cpp's streamed chat chunks (through xllamacpp's server engine) read into what the engine
replies: each answer's text cut at its stop strings, its tokens' log-probabilities, tool-call pieces,
how each answer ended and the tokens counted."""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from exojet.bus.logprobs import Logprobs, TokenLogprob
from exojet.bus.results import FinishReason
from exojet.bus.tools import ToolCall, ToolCallDelta, join_deltas
from exojet.runner.choice_text import ChoiceText
from exojet.runner.engine_backend import Emit


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str = ""


class _ToolCallPiece(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function = msgspec.field(default_factory=_Function)


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallPiece] | None = None


class _TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] = []


class _Logprobs(msgspec.Struct):
    content: list[_TokenLogprob] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta = msgspec.field(default_factory=_Delta)
    # A text completion's chunks carry their text here instead.
    text: str | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ServerError(msgspec.Struct):
    message: str = ""
    type: str = ""


class _Chunk(msgspec.Struct):
    """One streamed chunk of llama.cpp's server (the fields read here)."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _ServerError | None = None


chunk_decoder = msgspec.json.Decoder(_Chunk)


def _logprob(entry: _TopLogprob, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    raw = bytes(entry.bytes) if entry.bytes is not None else None
    return TokenLogprob(
        token=entry.token, logprob=entry.logprob, raw=None if raw == entry.token.encode() else raw, top=top
    )


def _logprobs(choice: _Choice, top: int | None) -> Logprobs:
    """A chunk's tokens and their log-probabilities, with the `top` likeliest (llama.cpp's OpenAI
    shape); none when `top` is None (the chat asked for none)."""
    if top is None or choice.logprobs is None or not choice.logprobs.content:
        return ()
    return tuple(_logprob(e, tuple(_logprob(t) for t in e.top_logprobs[:top])) for e in choice.logprobs.content)


_FINISH: dict[str, Literal["stop", "length", "tool_calls"]] = {"length": "length", "tool_calls": "tool_calls"}


class Generation:
    """What the chunks of one generation said so far (its `n` answers, by choice)."""

    def __init__(self, stops: list[str], emit: Emit | None, n: int = 1, top: int | None = None) -> None:
        self.answers = [ChoiceText(stops, i) for i in range(n)]
        self.top = top
        self.emit = emit
        self.deltas = 0
        self.first_at: float | None = None
        self.finish: dict[int, Literal["stop", "length", "tool_calls"]] = {}
        self.usage = _Usage()
        self.error: _ServerError | None = None
        self.failure: BaseException | None = None
        self.pieces: list[ToolCallDelta] = []

    def take(self, chunk: _Chunk) -> bool:
        """Fold one chunk in; True when the generation is over (an error, every answer at a stop string)."""
        if chunk.error is not None:
            self.error = chunk.error
            return True
        for choice in chunk.choices:
            if self.first_at is None and (choice.delta.content or choice.text or choice.delta.tool_calls):
                self.first_at = time.perf_counter()
            if choice.index >= len(self.answers) or choice.index in self.finish:
                continue  # an answer cut at its stop string: llama.cpp ends it on its own
            answer = self.answers[choice.index]
            content = choice.delta.content or choice.text
            logprobs = _logprobs(choice, self.top)
            if content or logprobs:
                self.deltas += 1
                delta, released, stopped = answer.feed(content or "", logprobs)
                self._emit(answer, delta, released)
                if stopped:
                    self.finish[choice.index] = "stop"
                    if len(self.finish) == len(self.answers):
                        return True
            for piece in choice.delta.tool_calls or ():
                self.deltas += 1
                self._tool_piece(answer, piece)
            if choice.finish_reason is not None:
                self.finish[choice.index] = _FINISH.get(choice.finish_reason, "stop")
        if chunk.usage is not None:
            # One usage chunk per answer of `n`: each counts its own tokens.
            completion = self.usage.completion_tokens + chunk.usage.completion_tokens
            self.usage = _Usage(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=completion)
        return False

    def _tool_piece(self, answer: ChoiceText, piece: _ToolCallPiece) -> None:
        # Text held back by the stop scanner goes out before the call it preceded.
        self._emit(answer, *answer.flush())
        delta = ToolCallDelta(
            index=piece.index, id=piece.id, name=piece.function.name, arguments=piece.function.arguments
        )
        self.pieces.append(delta)
        if self.emit is not None:
            self.emit(delta)

    def _emit(self, answer: ChoiceText, text: str, logprobs: Logprobs) -> None:
        if self.emit is not None and (text or logprobs):
            self.emit(answer.piece(text, logprobs))

    def end(self) -> None:
        """Send what every answer held back (the generation ended)."""
        for answer in self.answers:
            self._emit(answer, *answer.flush())

    def finish_reason(self, choice: int) -> FinishReason:
        # A cancelled generation ends before its finish chunks.
        return self.finish.get(choice, "cancelled")

    def calls(self) -> list[ToolCall]:
        return join_deltas(self.pieces)
