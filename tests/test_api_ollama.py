"""Ollama's API through the official `ollama` client, against a real stack.

`/api/chat` and `/api/generate` give what OpenAI's route gives for the same chat
(both are the one routed chat), whole and streamed as NDJSON; the model routes list
the Ready model; bad input gets Ollama's `{"error": ...}` and a 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import ollama
import pytest

from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import PROMPT, openai_answer, tiny_stack

pytestmark = pytest.mark.timeout(120)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    yield from tiny_stack(tmp_path_factory, "ollama")


@pytest.fixture(scope="module")
def host(stack: ApiStack) -> str:
    return stack.base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def llama(host: str) -> ollama.Client:
    return ollama.Client(host=host, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def expected(stack: ApiStack) -> tuple[str, int]:
    return openai_answer(stack, [{"role": "user", "content": PROMPT}], 24)


def test_chat_and_generate_whole_and_streamed_say_what_the_openai_route_says(
    llama: ollama.Client, expected: tuple[str, int]
) -> None:
    text, prompt_tokens = expected
    options = {"num_predict": 24, "temperature": 0, "top_p": 1, "seed": 7, "num_ctx": 2048}
    user = [{"role": "user", "content": PROMPT}]
    chat = llama.chat(model=MODEL, messages=user, options=options, stream=False, keep_alive="5m")
    assert chat.message.role == "assistant" and chat.message.content == text
    assert chat.done and chat.done_reason == "length" and chat.model == MODEL
    assert chat.eval_count == 24 and chat.prompt_eval_count == prompt_tokens
    assert chat.total_duration and chat.total_duration > 0

    parts = list(llama.chat(model=f"{MODEL}:latest", messages=user, options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 24

    # generate applies the chat template to its prompt: the same chat.
    generated = llama.generate(model=MODEL, prompt=PROMPT, options=options)
    assert generated.response == text and generated.done_reason == "length"
    pieces = list(llama.generate(model=MODEL, prompt=PROMPT, options=options, stream=True))
    assert "".join(p.response or "" for p in pieces) == text and pieces[-1].done


def test_a_stop_option_and_a_raw_prompt(llama: ollama.Client, expected: tuple[str, int]) -> None:
    text, prompt_tokens = expected
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = llama.chat(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], options={"num_predict": 24, "stop": [stop]}
    )
    assert stopped.message.content == text[: text.index(stop)] and stopped.done_reason == "stop"
    # raw: the prompt as given, without the chat template's role markers around it.
    raw = llama.generate(model=MODEL, prompt=PROMPT, raw=True, options={"num_predict": 12})
    assert raw.eval_count == 12
    assert raw.prompt_eval_count is not None and 0 < raw.prompt_eval_count < prompt_tokens
    # No prompt: Ollama's way to load a model, answered at once.
    loaded = llama.generate(model=MODEL)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_the_model_routes_list_the_ready_model(llama: ollama.Client) -> None:
    assert [m.model for m in llama.list().models] == [MODEL]
    assert [m.model for m in llama.ps().models] == [MODEL]
    # The instance's runner (MLX) states tool calls: clients read that before sending tools.
    assert llama.show(MODEL).capabilities == ["completion", "tools"]
    with pytest.raises(ollama.ResponseError) as missing:
        llama.show("local/not-placed")
    assert missing.value.status_code == 404 and "not-placed" in missing.value.error


def test_bad_input_gets_ollama_errors_with_a_4xx(host: str, llama: ollama.Client) -> None:
    user = [{"role": "user", "content": PROMPT}]
    with pytest.raises(ollama.ResponseError) as unknown:
        llama.chat(model="local/unknown", messages=user)
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as fmt:
        llama.chat(model=MODEL, messages=user, format={"type": "nonsense"})
    assert fmt.value.status_code == 400 and "the JSON schema does not compile" in fmt.value.error
    with pytest.raises(ollama.ResponseError) as wrong_key:
        ollama.Client(host=host, headers={"Authorization": "Bearer wrong"}).list()
    assert wrong_key.value.status_code == 401 and wrong_key.value.error == "Incorrect API key provided"

    for path, body, words in [
        ("chat", {"messages": user}, "model"),
        ("chat", {"model": MODEL, "messages": user, "options": {"top_k": 5}}, "top_k"),
        ("chat", {"model": MODEL, "messages": user, "options": {"temperature": "hot"}}, "temperature"),
        ("chat", {"model": MODEL, "messages": user, "format": "yaml"}, "format"),
        ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("generate", {"model": MODEL, "prompt": "x", "context": [1, 2]}, "context"),
        ("generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, "system"),
        ("show", {}, "model is required"),
    ]:
        answer = httpx.post(f"{host}/api/{path}", json=body, headers=AUTH, timeout=30)
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"], answer.json()
    not_json = httpx.post(f"{host}/api/chat", content=b"{oops", headers=AUTH, timeout=30)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
    # Unknown fields are ignored, as Ollama's server ignores them.
    fine = httpx.post(
        f"{host}/api/chat",
        json={"model": MODEL, "messages": user, "stream": False, "colour": "red", "options": {"num_predict": 2}},
        headers=AUTH,
        timeout=30,
    )
    assert fine.status_code == 200 and fine.json()["done"] is True
    assert httpx.get(f"{host}/api/version", headers=AUTH).json()["version"]
    assert httpx.get(f"{host}/api/chat", headers=AUTH).json() == {"error": "GET /api/chat: Method Not Allowed"}
