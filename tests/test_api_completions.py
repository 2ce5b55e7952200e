"""OpenAI's legacy completions through the official `openai` client, against a real stack.

The prompt goes to the model as given (no chat template: fewer prompt tokens than the
same text as a chat message), whole and streamed alike; a list of prompts is one
choice each; what exojet does not do is a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest

from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import PROMPT, openai_answer, openai_client, tiny_stack

pytestmark = pytest.mark.timeout(120)

OTHER = "Once upon a time"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    yield from tiny_stack(tmp_path_factory, "completions")


@pytest.fixture(scope="module")
def api(stack: ApiStack) -> openai.OpenAI:
    return openai_client(stack)


def test_a_prompt_is_continued_as_given_whole_and_streamed(stack: ApiStack, api: openai.OpenAI) -> None:
    _, chat_prompt_tokens = openai_answer(stack, [{"role": "user", "content": PROMPT}], 4)
    # OpenAI's default length: 16 tokens.
    whole = api.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert whole.object == "text_completion" and whole.model == MODEL and len(whole.choices) == 1
    text = whole.choices[0].text
    assert text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 16
    # No chat template around the prompt: fewer tokens than the same text as a chat message.
    assert 0 < whole.usage.prompt_tokens < chat_prompt_tokens

    chunks = list(
        api.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16

    # A stop sequence from the middle of the text ends it just before.
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = api.completions.create(model=MODEL, prompt=PROMPT, stop=stop)
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_a_list_of_prompts_is_a_choice_each(api: openai.OpenAI) -> None:
    alone = [api.completions.create(model=MODEL, prompt=p, max_tokens=8).choices[0].text for p in (PROMPT, OTHER)]
    both = api.completions.create(model=MODEL, prompt=[PROMPT, OTHER], max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone
    assert both.usage is not None and both.usage.completion_tokens == 16
    streamed = api.completions.create(model=MODEL, prompt=[PROMPT, OTHER], max_tokens=8, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == alone


def test_bad_input_is_a_400_naming_it(stack: ApiStack, api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="local/unknown", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as echo:
        api.completions.create(model=MODEL, prompt=PROMPT, echo=True)
    assert echo.value.body["param"] == "echo"  # type: ignore[index]
    url = f"{stack.base_url}/completions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in [
        ({"model": MODEL, "prompt": PROMPT, "n": 2}, "n"),
        ({"model": MODEL, "prompt": PROMPT, "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": PROMPT, "suffix": "end"}, "suffix"),
        ({"model": MODEL, "prompt": PROMPT, "logprobs": 2}, "logprobs"),
        ({"model": MODEL, "prompt": PROMPT, "colour": "red"}, "colour"),
        ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ]:
        answer = httpx.post(url, json=body, headers=auth, timeout=30)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param, answer.json()
