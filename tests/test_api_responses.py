"""OpenAI's Responses API through the official `openai` client, against a real stack.

A response says what the chat completions route says for the same chat (both are the
one routed chat), whole and streamed as the Responses events; nothing is stored, and
what would need state or a built-in tool is a 400 naming it (function tools:
tests/test_api_responses_tools.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest

from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import PROMPT, openai_answer, openai_client, tiny_stack

pytestmark = pytest.mark.timeout(120)

INSTRUCTIONS = "You are terse."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    yield from tiny_stack(tmp_path_factory, "responses")


@pytest.fixture(scope="module")
def api(stack: ApiStack) -> openai.OpenAI:
    return openai_client(stack)


def test_a_response_whole_and_streamed_says_what_the_chat_route_says(stack: ApiStack, api: openai.OpenAI) -> None:
    text, prompt_tokens = openai_answer(stack, [{"role": "user", "content": PROMPT}], 24)
    whole = api.responses.create(model=MODEL, input=PROMPT, max_output_tokens=24, temperature=0, store=False)
    assert whole.object == "response" and whole.model == MODEL and whole.output_text == text
    # Cut at max_output_tokens: incomplete, as OpenAI says it.
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage is not None and whole.usage.output_tokens == 24 and whole.usage.input_tokens == prompt_tokens

    # instructions and input as messages: the chat with a system message.
    with_system, _ = openai_answer(
        stack, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": PROMPT}], 24
    )
    messages = api.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=[{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}],
        max_output_tokens=24,
        metadata={"who": "test"},
    )
    assert messages.output_text == with_system and messages.metadata == {"who": "test"}

    events = list(api.responses.create(model=MODEL, input=PROMPT, max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.output_text == text
    assert last.response.id == events[0].response.id  # type: ignore[union-attr]


def test_bad_input_is_a_400_naming_it(stack: ApiStack, api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        api.responses.create(model="local/unknown", input=PROMPT)
    with pytest.raises(openai.BadRequestError) as stored:
        api.responses.create(model=MODEL, input=PROMPT, store=True)
    assert stored.value.body["param"] == "store" and "stateless" in stored.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as previous:
        api.responses.create(model=MODEL, input=PROMPT, previous_response_id="resp_1")
    assert previous.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as tools:
        api.responses.create(model=MODEL, input=PROMPT, tools=[{"type": "web_search"}])
    assert tools.value.body["param"] == "tools[0].type" and "'web_search'" in tools.value.message  # type: ignore[index]

    url = f"{stack.base_url}/responses"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in [
        ({"model": MODEL, "input": PROMPT, "colour": "red"}, "colour"),
        ({"model": MODEL, "input": PROMPT, "max_output_tokens": 8}, "max_output_tokens"),
        ({"model": MODEL, "input": PROMPT, "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": MODEL, "input": []}, "input"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ]:
        answer = httpx.post(url, json=body, headers=auth, timeout=30)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param, answer.json()
    assert httpx.post(url, content=b"{oops", headers=auth, timeout=30).status_code == 400


def test_the_openapi_document_has_every_dialect_route(stack: ApiStack) -> None:
    document = httpx.get(f"{stack.base_url.removesuffix('/v1')}/openapi.json", headers={"x-api-key": API_KEY}).json()
    routes = {path: set(methods) for path, methods in document["paths"].items()}
    posts = ["/v1/messages", "/v1/messages/count_tokens", "/api/chat", "/api/generate", "/api/show"]
    posts += ["/v1/responses", "/v1/completions", "/v1/chat/completions"]
    assert all(routes[path] == {"post"} for path in posts)
    assert all(routes[path] == {"get"} for path in ("/api/tags", "/api/ps", "/api/version", "/v1/models"))
