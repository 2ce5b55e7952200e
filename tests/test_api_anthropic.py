"""Anthropic's Messages API through the official `anthropic` client, against a real stack.

The same chat through `/v1/messages` and through OpenAI's route gives the same text
(both are the one routed chat); bad input gets Anthropic's error shape and a 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx2 as httpx
import pytest

from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import PROMPT, openai_answer, tiny_stack

pytestmark = pytest.mark.timeout(120)

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    yield from tiny_stack(tmp_path_factory, "anthropic")


@pytest.fixture(scope="module")
def claude(stack: ApiStack) -> anthropic.Anthropic:
    # The client adds /v1 itself.
    return anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(stack: ApiStack) -> tuple[str, int]:
    return openai_answer(stack, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}], 24)


def test_a_message_whole_and_streamed_says_what_the_openai_route_says(
    stack: ApiStack, claude: anthropic.Anthropic, expected: tuple[str, int]
) -> None:
    text, prompt_tokens = expected
    # The system prompt as a string and as text blocks is the same chat.
    for system in (SYSTEM, [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]):
        message = claude.messages.create(  # type: ignore[call-overload]
            model=MODEL,
            max_tokens=24,
            system=system,
            messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
            metadata={"user_id": "u1"},
            # Sampling parameters: Anthropic's newer clients no longer name them.
            extra_body={"temperature": 0, "top_p": 1},
            extra_headers={"anthropic-version": "2023-06-01"},
        )
        assert message.type == "message" and message.role == "assistant" and message.model == MODEL
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == text
        assert message.stop_reason == "max_tokens" and message.stop_sequence is None
        assert message.usage.output_tokens == 24
        assert message.usage.input_tokens == prompt_tokens

    with claude.messages.stream(
        model=MODEL, max_tokens=24, system=SYSTEM, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        assert "".join(stream.text_stream) == text
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24
    assert final.usage.input_tokens == prompt_tokens

    # The events in Anthropic's order, ping included (the client hides pings: read them raw).
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/messages", json=body, headers={"x-api-key": API_KEY}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        kinds = [line.removeprefix("event: ") for line in raw.iter_lines() if line.startswith("event: ")]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_a_stop_sequence_ends_the_message_and_count_tokens_counts_the_prompt(
    claude: anthropic.Anthropic, expected: tuple[str, int]
) -> None:
    text, prompt_tokens = expected
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    message = claude.messages.create(
        model=MODEL,
        max_tokens=24,
        system=SYSTEM,
        stop_sequences=[stop],
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]
    counted = claude.messages.count_tokens(model=MODEL, system=SYSTEM, messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens == prompt_tokens


def test_bad_input_gets_anthropic_errors_with_a_4xx(stack: ApiStack, claude: anthropic.Anthropic) -> None:
    user = [{"role": "user", "content": PROMPT}]
    with pytest.raises(anthropic.NotFoundError) as unknown_model:
        claude.messages.create(model="local/unknown", max_tokens=4, messages=user)  # type: ignore[arg-type]
    assert unknown_model.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    bad_key = anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as wrong:
        bad_key.messages.create(model=MODEL, max_tokens=4, messages=user)  # type: ignore[arg-type]
    assert wrong.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided"},
    }
    with pytest.raises(anthropic.BadRequestError) as tools:
        claude.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=user,  # type: ignore[arg-type]
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert tools.value.body["error"]["message"].startswith("tools.0.type: server tools")  # type: ignore[index]

    url = f"{stack.base_url}/messages"
    # Anthropic's clients send the key as x-api-key; a bearer header works too.
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body, words in [
        ({"model": MODEL, "messages": user}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 4, "messages": user, "colour": "red"}, "colour: Extra inputs are not"),
        ({"model": MODEL, "max_tokens": 4, "messages": user, "top_k": 5}, "top_k"),
        ({"model": MODEL, "max_tokens": 4, "messages": user, "output_config": {"format": {}}}, "output_config.format"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "image"),
        (
            {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}],
                    }
                ],
            },
            "a tool result takes text blocks, not 'image'",
        ),
        ({"model": MODEL, "max_tokens": 4, "messages": user, "temperature": 1.5}, "temperature"),
        ({"model": MODEL, "max_tokens": 0, "messages": user}, "max_tokens"),
    ]:
        answer = httpx.post(url, json=body, headers=auth, timeout=30)
        assert answer.status_code == 400, answer.text
        error = answer.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert words in error["error"]["message"], error
    not_json = httpx.post(url, content=b"{oops", headers={"x-api-key": API_KEY}, timeout=30)
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{url}/count_tokens", json={"model": MODEL}, headers=auth, timeout=30)
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    # count_tokens answers no message: max_tokens is not one of its fields.
    counted = httpx.post(f"{url}/count_tokens", json={"model": MODEL, "messages": user, "max_tokens": 4}, headers=auth)
    assert counted.status_code == 400
    assert counted.json()["error"]["message"] == "max_tokens: Extra inputs are not permitted"
    wrong_method = httpx.get(url, headers=auth, timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
