"""MLX batching (`runner/mlx_batch.py`, `runner/mlx_capacity.py`): how many chats memory allows, chats that differ in
everything served in one batch, each as it would be alone, and a chat's `n` answers (one prompt
computed once, each answer its own key, stop string and end), and logprobs beside tools. The engine contract
(tests/test_engine.py) covers the rest: greedy answers beside others, cancel, crash, unload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
import pytest_asyncio

from exojet.bus.results import ChoiceResult
from exojet.bus.sampling import Sampling
from exojet.runner.engine import Engine
from exojet.runner.engine_protocol import Generate, Message
from exojet.runner.mlx_batch import BatchChat, BatchDriver, Step
from exojet.runner.mlx_capacity import (
    CHAT_WINDOW,
    KV_MAX_FREE_FRACTION,
    MAX_CHATS,
    Capacity,
    chat_capacity,
    kv_bytes_per_token,
)
from tests.engine_contract import collect
from tests.logprobs_contract import collect_choices

GB = 10**9
# The default model (SmolLM2-135M) dense: 30 layers, 3 KV heads of 64, float32 keys and values.
SMOLLM_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4


def test_capacity_is_what_memory_allows_each_chat_at_its_window() -> None:
    # 4,096 tokens of 46 kB: 189 MB a chat, 26 of them in half of 10 GB.
    assert chat_capacity(10 * GB, SMOLLM_KV_BYTES_PER_TOKEN, 8192).chats == 26
    # A short window counts as itself, a long or unknown one as CHAT_WINDOW.
    assert chat_capacity(4 * GB, SMOLLM_KV_BYTES_PER_TOKEN, 1024).chats == MAX_CHATS
    assert chat_capacity(10 * GB, SMOLLM_KV_BYTES_PER_TOKEN, 1 << 20) == chat_capacity(
        10 * GB, SMOLLM_KV_BYTES_PER_TOKEN, None
    )
    # Never none: a model that leaves no room still serves one chat at a time.
    assert chat_capacity(100_000_000, SMOLLM_KV_BYTES_PER_TOKEN, 8192).chats == 1
    at_least_8 = 8 * SMOLLM_KV_BYTES_PER_TOKEN * CHAT_WINDOW / KV_MAX_FREE_FRACTION
    assert chat_capacity(int(at_least_8), SMOLLM_KV_BYTES_PER_TOKEN, 8192).chats == 8
    assert "189 MB of KV cache each" in chat_capacity(10 * GB, SMOLLM_KV_BYTES_PER_TOKEN, 8192).reason


def test_kv_bytes_per_token_is_measured_on_the_model(tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model_dir))
    # The tiny llama: 4 layers, 2 KV heads of 16 (hidden 64 over 4 heads), float32.
    assert kv_bytes_per_token(model) == 4 * 2 * 2 * 16 * 4
    model.set_dtype(mx.float16)
    assert kv_bytes_per_token(model) == 4 * 2 * 2 * 16 * 2


@pytest_asyncio.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """An MLX engine child with the tiny llama loaded."""
    eng = Engine("mlx")
    await eng.start()
    try:
        await eng.load(str(tiny_model_dir))
        yield eng
    finally:
        await eng.stop()


@pytest.mark.timeout(120)
async def test_chats_that_differ_in_everything_answer_in_a_batch_as_each_alone(engine: Engine) -> None:
    def ask(topic: str, **sampling: Any) -> Generate:
        return Generate(
            messages=[Message(role="user", content=f"tell me about {topic}")], sampling=Sampling(**sampling)
        )

    rain = (await collect(engine, ask("rain", max_tokens=30)))[1].text
    asks = [
        ask("cats", max_tokens=5),
        # Seeded: drawn from its own key, whatever the others draw.
        ask("owls", max_tokens=30, temperature=1.5, top_p=0.9, seed=7),
        ask("bread", max_tokens=30, temperature=1.0, seed=3),
        ask("rain", max_tokens=30, stop=(rain[10:14],)),
        ask("trains", max_tokens=1),
    ]
    alone = [(await collect(engine, a))[1] for a in asks]

    together = await asyncio.gather(*(collect(engine, a) for a in asks))

    for (chunks, done), one in zip(together, alone, strict=True):
        assert "".join(chunks) == done.text == one.text
        assert (done.finish_reason, done.completion_tokens) == (one.finish_reason, one.completion_tokens)
    assert [d.completion_tokens for d in alone[:1] + alone[4:]] == [5, 1]
    assert alone[3].finish_reason == "stop" and alone[3].text == rain[: rain.index(rain[10:14])]
    assert alone[1].text != (await collect(engine, ask("owls", max_tokens=30, temperature=1.5, seed=8)))[1].text


@pytest.mark.timeout(120)
async def test_a_conversations_next_turn_from_the_kept_cache_answers_as_computed_whole(engine: Engine) -> None:
    turn1 = [Message(role="user", content="tell me a story about a small llama on a hill")]
    _, first = await collect(engine, Generate(messages=turn1, sampling=Sampling(max_tokens=20)))
    turn2 = [*turn1, Message(role="assistant", content=first.text), Message(role="user", content="and then?")]

    # Unseeded: from the first turn's cache; seeded (greedy still): computed from its whole prompt.
    _, reused = await collect(engine, Generate(messages=turn2, sampling=Sampling(max_tokens=20)))
    _, whole = await collect(engine, Generate(messages=turn2, sampling=Sampling(max_tokens=20, seed=1)))
    _, again = await collect(engine, Generate(messages=turn2, sampling=Sampling(max_tokens=20)))

    assert reused.text == whole.text == again.text
    assert reused.prompt_tokens == whole.prompt_tokens > first.prompt_tokens + first.completion_tokens


class _Counted:
    """The real model, counting the tokens it computes (each row's of each call)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokens = 0

    def __call__(self, inputs: Any, cache: Any = None) -> Any:
        self.tokens += inputs.size
        return self.model(inputs, cache=cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _drain(chat: BatchChat) -> list[Step]:
    steps: list[Step] = []
    while not chat.ended:
        step = chat.next_step(30)
        assert step is not None, "no token within 30 s"
        steps.append(step)
    return steps


@pytest.mark.timeout(120)
def test_n_answers_compute_their_prompt_once_and_leave_the_batch_together(tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model_dir))
    counted = _Counted(model)
    driver = BatchDriver(counted, [], Capacity(4, "test"))
    try:
        prompt = list(range(10, 60))
        steps = _drain(driver.submit(prompt, Generate(messages=[], sampling=Sampling(max_tokens=5, n=4))))

        assert sorted((s.choice, s.finish) for s in steps if s.finish) == [(c, "length") for c in range(4)]
        assert [sum(s.choice == c for s in steps) for c in range(4)] == [5] * 4
        # All but the last prompt token once (choice 0's row), then the 4 rows a token a step (the
        # generator computes one step ahead); 4 prefills would be 4 * 49 + 24 = 220.
        assert counted.tokens == (len(prompt) - 1) + 4 * (5 + 1)

        # An endless chat's answers all leave on one word: 4 rows left behind would hold the batch
        # (capacity 4), and the next chat's rows would wait for ever.
        endless = driver.submit(
            list(range(100, 140)), Generate(messages=[], sampling=Sampling(max_tokens=1_000_000, n=4))
        )
        assert endless.next_step(30) is not None
        endless.leave()
        after = driver.submit(list(range(200, 240)), Generate(messages=[], sampling=Sampling(max_tokens=3, n=4)))
        assert len(_drain(after)) == 12

        # Beside a shorter prompt in the same prefill (the generator pads them), each answer is
        # still the chat alone (seeded, so each computes its whole prompt, not a cached one).
        greedy = Sampling(max_tokens=5, seed=1)
        alone = [s.token for s in _drain(driver.submit(prompt, Generate(messages=[], sampling=greedy)))]
        short = driver.submit(prompt[:20], Generate(messages=[], sampling=greedy))
        four = driver.submit(prompt, Generate(messages=[], sampling=Sampling(max_tokens=5, seed=1, n=4)))
        _drain(short)
        steps = _drain(four)
        assert [[s.token for s in steps if s.choice == c] for c in range(4)] == [alone] * 4
    finally:
        driver.close()


def _ask(**kwargs: Any) -> Generate:
    return Generate(messages=[Message(role="user", content="tell me about owls")], sampling=Sampling(**kwargs))


@pytest.mark.timeout(120)
async def test_a_seeded_chats_answers_each_draw_from_a_key_of_their_own(engine: Engine) -> None:
    sampled: dict[str, Any] = {"max_tokens": 16, "temperature": 1.5, "seed": 5}

    _, three = await collect(engine, _ask(n=3, **sampled))
    _, again = await collect(engine, _ask(n=3, **sampled))
    _, alone = await collect(engine, _ask(**sampled))
    _, two = await collect(engine, _ask(n=2, **sampled))

    texts = [three.text, *(c.text for c in three.choices)]
    assert len(set(texts)) == 3
    assert [again.text, *(c.text for c in again.choices)] == texts
    # Choice 0 is the chat asked alone; choice i the same whatever n is.
    assert alone.text == texts[0]
    assert [two.text, two.choices[0].text] == texts[:2]


@pytest.mark.timeout(120)
async def test_a_stop_string_ends_its_own_answer_and_the_others_go_on(engine: Engine) -> None:
    sampled: dict[str, Any] = {"max_tokens": 16, "temperature": 1.5, "seed": 5, "n": 2}
    _, free = await collect(engine, _ask(**sampled))
    first, second = free.text, free.choices[0].text
    stop = next(second[i : i + 3] for i in range(4, len(second)) if second[i : i + 3] not in first)

    chunks, cut = await collect_choices(engine, _ask(stop=[stop], logprobs=True, **sampled))

    assert (cut.text, cut.finish_reason) == (first, "length")
    assert cut.choices == (ChoiceResult(index=1, text=second[: second.index(stop)], finish_reason="stop"),)
    assert ["".join(t.text for t in chunks[c]) for c in (0, 1)] == [cut.text, cut.choices[0].text]
    assert cut.completion_tokens < 2 * 16
