"""The engine contract's part for `logprobs`, `top_logprobs`, `n` and `logit_bias` (mixed into an
engine's contract, as tests/engine_contract.py's `ToolsContract` is): each generated token's
log-probability comes with the text it made, `n` answers come from one generation, a bias moves
the sampler, and what an engine cannot do is refused by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from exojet.bus.logprobs import TokenLogprob
from exojet.bus.sampling import Sampling
from exojet.runner.engine import Engine
from exojet.runner.engine_errors import EngineError
from exojet.runner.engine_protocol import Done, Generate, Message, Token
from tests.engine_contract import PROMPT, WEATHER, Direct, class_loop

# A token id of every test model's vocabulary that is a piece of text ("L" in SmolLM2's and the tiny one's).
ORDINARY_TOKEN = 60


async def collect_choices(engine: Engine, req: Generate) -> tuple[dict[int, list[Token]], Done]:
    """Each answer's Token replies, by choice, and the Done."""
    tokens: dict[int, list[Token]] = {}
    async for reply in engine.generate(req):
        if isinstance(reply, Token):
            tokens.setdefault(reply.choice, []).append(reply)
        elif isinstance(reply, Done):
            return tokens, reply
    raise AssertionError("generation ended without Done")


def _characters(text: str) -> str:
    return text.replace("\ufffd", "")


def logprobs_of(tokens: list[Token]) -> list[TokenLogprob]:
    return [t for token in tokens for t in token.logprobs]


class LogprobsContract:
    # Whether the answers of a greedy `n` equal the answer alone (kernels that round alike).
    BATCH_EXACT = True
    # Whether every token's log-probability comes, those ending inside a character too.
    WHOLE_LOGPROBS = True

    @class_loop
    @pytest.mark.timeout(300)
    async def test_each_tokens_logprob_comes_with_its_text_and_the_likeliest_beside_it(
        self, engine: Engine, model_path: Path
    ) -> None:
        await engine.load(str(model_path))
        req = Generate(messages=PROMPT, sampling=Sampling(max_tokens=24, logprobs=True, top_logprobs=3))

        tokens, done = await collect_choices(engine, req)

        entries = logprobs_of(tokens[0])
        assert "".join(t.text for t in tokens[0]) == done.text
        # The tokens join to the text (bytes of a character cut in two show as U+FFFD in both).
        assert "".join(e.token for e in entries) == done.text
        assert done.completion_tokens == 24
        if "\ufffd" in done.text:
            # Random weights' bytes that end inside a character: llama.cpp's stream sends a chunk the
            # log-probability of its last token only, and no chunk for such a token.
            assert len(entries) == 24 if self.WHOLE_LOGPROBS else 0 < len(entries) <= 24
        else:
            # A token that is part of a character carries its bytes: they join to the text's.
            assert b"".join(e.token_bytes() for e in entries) == done.text.encode()
            assert len(entries) == 24
        for entry in entries:
            assert entry.logprob <= 0 and math.isfinite(entry.logprob)
            assert len(entry.top) == 3
            assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
            # Greedy: the token taken is the likeliest.
            assert entry.logprob == pytest.approx(entry.top[0].logprob, abs=1e-4)
        plain, _ = await collect_choices(engine, Generate(messages=PROMPT, sampling=Sampling(max_tokens=24)))
        assert logprobs_of(plain[0]) == []

    @class_loop
    @pytest.mark.timeout(300)
    async def test_n_answers_come_from_one_generation_each_with_its_choice(
        self, engine: Engine, model_path: Path, direct: Direct
    ) -> None:
        await engine.load(str(model_path))
        tokens, done = await collect_choices(engine, Generate(messages=PROMPT, sampling=Sampling(max_tokens=12, n=3)))

        assert sorted(tokens) == [0, 1, 2]
        assert [c.index for c in done.choices] == [1, 2]
        texts = [done.text, *(c.text for c in done.choices)]
        assert ["".join(t.text for t in tokens[i]) for i in range(3)] == texts
        assert [done.finish_reason, *(c.finish_reason for c in done.choices)] == ["length"] * 3
        assert done.completion_tokens == 3 * 12
        if self.BATCH_EXACT:
            assert texts == [direct(12)] * 3
        sampled, done = await collect_choices(
            engine, Generate(messages=PROMPT, sampling=Sampling(max_tokens=12, n=2, temperature=1.5, logprobs=True))
        )
        drawn = [done.text, done.choices[0].text]
        # Sampled bytes of a random model are often not UTF-8: the content's decoder (llama.cpp's
        # whole answer) and each token's may count a broken sequence as one U+FFFD or two, so
        # the characters are compared without them (6 in 150 seeds differed in that count alone).
        # A draw may also send no token at all: an end-of-text drawn first, or only bytes that end
        # inside a character (llama.cpp's stream sends no chunk for those).
        joined = ["".join(e.token for e in logprobs_of(sampled.get(i, []))) for i in (0, 1)]
        assert [_characters(t) for t in joined] == [_characters(t) for t in drawn]
        assert drawn[0] != drawn[1]  # two draws of near-uniform tokens

    @class_loop
    @pytest.mark.timeout(300)
    async def test_a_logit_bias_of_100_makes_the_greedy_answer_that_token(
        self, engine: Engine, model_path: Path
    ) -> None:
        await engine.load(str(model_path))
        req = Generate(
            messages=PROMPT, sampling=Sampling(max_tokens=6, logprobs=True, logit_bias={ORDINARY_TOKEN: 100.0})
        )

        tokens, done = await collect_choices(engine, req)

        entries = logprobs_of(tokens[0])
        assert len(entries) == 6
        assert len({e.token for e in entries}) == 1
        assert done.text == entries[0].token * 6

    @class_loop
    @pytest.mark.timeout(60)
    async def test_what_cannot_be_served_is_refused_by_name(self, engine: Engine, model_path: Path) -> None:
        loaded = await engine.load(str(model_path))
        refused = [
            Generate(messages=PROMPT, sampling=Sampling(max_tokens=4, logit_bias={10_000_000: 1.0})),
            Generate(messages=PROMPT, sampling=Sampling(max_tokens=4, n=loaded.chat_capacity + 1)),
            Generate(
                messages=[Message(role="user", content="weather?")],
                tools=(WEATHER,),
                sampling=Sampling(max_tokens=4, n=2),
            ),
        ]
        for req in refused:
            with pytest.raises(EngineError) as err:
                await collect_choices(engine, req)
            assert err.value.error_type == "InvalidRequest", req
        _, done = await collect_choices(engine, Generate(messages=PROMPT, sampling=Sampling(max_tokens=4)))
        assert done.completion_tokens == 4

    @class_loop
    @pytest.mark.timeout(120)
    async def test_logprobs_beside_tools_only_where_no_call_is_read_from_the_text(
        self, engine: Engine, model_path: Path
    ) -> None:
        await engine.load(str(model_path))
        ask = [Message(role="user", content="what is the weather in paris?")]
        reported = Sampling(max_tokens=8, logprobs=True)

        # tool_choice none: a plain answer, whose tokens join to it.
        chunks, done = await collect_choices(
            engine, Generate(messages=ask, tools=(WEATHER,), tool_choice="none", sampling=reported)
        )
        assert _characters("".join(e.token for t in chunks[0] for e in t.logprobs)) == _characters(done.text)
        assert done.completion_tokens == 8
        # A call the model may make is read out of its text (the test models' templates render no
        # tools: the generic path's JSON): refused by name, not reported wrong or left out.
        for choice in ("auto", "required"):
            with pytest.raises(EngineError) as err:
                await collect_choices(
                    engine, Generate(messages=ask, tools=(WEATHER,), tool_choice=choice, sampling=reported)
                )
            assert err.value.error_type == "InvalidRequest" and "logprobs" in str(err.value)
