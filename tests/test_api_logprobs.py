"""logprobs, top_logprobs, n and logit_bias through the official `openai` client, on a real stack
serving the tiny random llama on each engine (llama.cpp, MLX): OpenAI's shapes whole and streamed,
the tokens joining to each answer's text, the streamed answers equal to the whole ones, and the
bounds as named 400s."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.api_stack import API_KEY, MODEL, start_gguf_stack, start_stack
from tests.logprobs_contract import ORDINARY_TOKEN

pytestmark = pytest.mark.timeout(180)

ASK = [{"role": "user", "content": "tell me a story about owls"}]


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp(f"logprobs-{request.param}")
    if request.param == "llamacpp":
        stack = start_gguf_stack(root, tiny_model_dir)
    else:
        shutil.copytree(tiny_model_dir, root / "models" / "local--tiny")
        stack = start_stack(root, root / "models")
    try:
        yield openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    finally:
        stack.close()


def _tokens(logprobs: Any) -> list[Any]:
    assert logprobs is not None and logprobs.content is not None
    return list(logprobs.content)


def test_n_answers_with_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 10, "temperature": 0}

    whole = client.chat.completions.create(**ask, n=2, logprobs=True, top_logprobs=2)

    assert [c.index for c in whole.choices] == [0, 1]
    texts = [c.message.content or "" for c in whole.choices]
    for choice in whole.choices:
        tokens = _tokens(choice.logprobs)
        assert "".join(t.token for t in tokens) == choice.message.content
        # On MLX a random token that ends inside a UTF-8 character adds no text (and no bytes): the
        # next carries the whole character.
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes is not None for t in tokens)
        assert choice.finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    # Greedy on F32 weights: the two answers of one batch are the same.
    assert texts[0] == texts[1] and texts[0]

    streamed = client.chat.completions.create(**ask, n=2, logprobs=True, top_logprobs=2, stream=True)
    said: dict[int, str] = {}
    joined: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for part in streamed:
        for choice in part.choices:
            said[choice.index] = said.get(choice.index, "") + (choice.delta.content or "")
            if choice.logprobs is not None:
                joined[choice.index] = joined.get(choice.index, "") + "".join(t.token for t in _tokens(choice.logprobs))
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert [said[0], said[1]] == [joined[0], joined[1]] == texts
    assert finish == {0: "length", 1: "length"}

    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == texts[0]


def test_a_logit_bias_moves_the_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, logit_bias={str(ORDINARY_TOKEN): 100}, logprobs=True
    )
    tokens = _tokens(answer.choices[0].logprobs)
    assert len({t.token for t in tokens}) == 1
    assert answer.choices[0].message.content == tokens[0].token * 5
    assert all(t.top_logprobs == [] for t in tokens)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),
    ],
)
def test_out_of_bounds_is_a_named_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, stream=stream, **extra)
        assert param in str(err.value)
