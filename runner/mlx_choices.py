"""A chat's answers on MLX (its `n`, one by default) on their way out of the engine: each answer's
detokenizer, its text (stop strings, tool calls: `AnswerStream`) and how it ended, read from the
batch driver's steps; and the generation's `Done`, answer 0 in its fields, the others in `choices`.

The answers of one chat end apart: a stop string takes its own answer's row out of the batch, the
others go on; a cancel ends all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from exojet.bus.results import ChoiceResult
from exojet.runner.answer_stream import AnswerStream
from exojet.runner.engine_protocol import Done, Generate
from exojet.runner.mlx_batch import BatchChat, ChoiceProcessors, Step
from exojet.runner.mlx_logprobs import token_logprobs

# A batched chat waiting for its next token looks at its cancel flag this often.
CANCEL_POLL_S = 0.05

Finish = Literal["stop", "length", "cancelled"]


class Answer:
    """One answer of a chat: where its text goes, and how it ended (None: not yet)."""

    def __init__(self, stream: AnswerStream, detokenizer: Any) -> None:
        self.stream = stream
        self.detokenizer = detokenizer
        self.finish: Finish | None = None
        self.tokens = 0

    def take(self, step: Step, tokenizer: Any) -> bool:
        """Add the step's token to the answer; True once it ended (a stop string, its model's
        end-of-sequence token, its `max_tokens`)."""
        # The end-of-sequence token ends a generation without being part of it.
        eos = step.finish == "stop"
        if not eos:
            self.detokenizer.add_token(step.token)
            self.tokens += 1
        if step.finish is not None:
            self.detokenizer.finalize()
        text = self.detokenizer.last_segment
        stopped = self.stream.feed(text, () if eos else token_logprobs(tokenizer, text, step))
        if stopped or step.finish is not None:
            self.finish = "stop" if stopped else step.finish
        return self.finish is not None


class Call(msgspec.Struct, frozen=True):
    """One generation as the engine took it: the request, its prompt's tokens, its answers, and
    the processors of each answer's logits (a grammar's mask, a bias)."""

    req: Generate
    prompt: list[int]
    answers: tuple[Answer, ...]
    cancelled: Callable[[], bool]
    started: float
    processors: ChoiceProcessors = ()


def read_batched(chat: BatchChat, call: Call, tokenizer: Any) -> float | None:
    """Feed each answer its tokens from the batch until all ended (or a cancel ended them); the
    time of the first token (None: none came)."""
    first_at = None
    try:
        while any(a.finish is None for a in call.answers):
            if call.cancelled():
                for answer in call.answers:
                    answer.finish = answer.finish or "cancelled"
                break
            # Bounded, so a cancel is seen while a long prompt is prefilled.
            step = chat.next_step(CANCEL_POLL_S)
            if step is None:
                continue
            first_at = first_at or time.perf_counter()
            answer = call.answers[step.choice]
            # A row's step that came before it left on its answer's stop string is not its answer's.
            if answer.finish is None and answer.take(step, tokenizer):
                chat.leave((step.choice,))
    finally:
        chat.leave()
    return first_at


def done(call: Call, first_at: float | None) -> Done:
    """A generation's end: the text held back for a possible stop string sent, its calls, its numbers."""
    ends = [a.stream.finish() for a in call.answers]
    text, calls = ends[0]
    finish = call.answers[0].finish or "length"
    completion_tokens = sum(a.tokens for a in call.answers)
    ended = time.perf_counter()
    first_at = first_at or ended
    # Decode speed: the tokens after the first, over the time after the first.
    decode_seconds = ended - first_at
    decoded = completion_tokens - 1
    return Done(
        text=text,
        finish_reason="tool_calls" if calls and finish == "stop" else finish,
        prompt_tokens=len(call.prompt),
        completion_tokens=completion_tokens,
        tokens_per_second=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
        time_to_first_token=first_at - call.started,
        tool_calls=calls,
        choices=tuple(
            ChoiceResult(index=i, text=t, finish_reason=a.finish or "length")
            for i, (a, (t, _)) in enumerate(zip(call.answers, ends, strict=True))
            if i > 0
        ),
    )
