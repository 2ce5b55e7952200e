"""Tool calls and structured output through the official `openai` client, on a real stack serving
the tiny random llama on each engine (llama.cpp, MLX): a required or named call is valid against its function's
schema, whole and streamed (the streamed pieces join to the whole call), a tool's result goes back
in the history, a json_schema answer parses and validates, and what cannot fit is a named 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema_rs
import msgspec
import openai
import pytest

from exojet.runner.engine_llamacpp import MAX_CONTEXT
from tests import engine_contract as contract
from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import tools_stack

pytestmark = pytest.mark.timeout(180)

# The contract's tool, as a client sends it.
WEATHER: dict[str, Any] = msgspec.to_builtins(contract.WEATHER)
ASK = [{"role": "user", "content": "what is the weather in paris?"}]


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ApiStack]:
    yield from tools_stack(tmp_path_factory, tiny_model_dir, request.param)


@pytest.fixture
def client(stack: ApiStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def _valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema_rs.validate(WEATHER["function"]["parameters"], arguments)
    return arguments


def test_a_required_call_answers_tool_calls_valid_against_the_schema(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=choice,
            max_tokens=200,  # type: ignore[arg-type]
        )
        [only] = answer.choices
        assert only.finish_reason == "tool_calls"
        assert only.message.content is None
        assert only.message.tool_calls is not None and len(only.message.tool_calls) >= 1
        for call in only.message.tool_calls:
            _valid_call(call)


def test_streamed_call_pieces_join_to_the_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for part in stream:
        for choice in part.choices:
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] = piece.function.name or call["name"]
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    [call] = calls.values()
    assert call["id"] and call["name"] == "get_weather"
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(call["arguments"]))


def test_a_tools_result_goes_back_in_the_history(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200
    )
    calls = first.choices[0].message.tool_calls
    assert calls
    history: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": '{"sky": "clear"}'} for c in calls),
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_a_json_schema_answer_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}, "word": {"enum": ["yes", "no"]}},
        "required": ["answer", "word"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "how many cats? JSON please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}},
        max_tokens=200,
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema_rs.validate(schema, json.loads(answer.choices[0].message.content or ""))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function"),
    ],
)
def test_what_cannot_fit_is_a_named_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert err.value.status_code == 400
    assert param in str(err.value)


def test_a_chat_the_model_cannot_take_is_a_400_before_any_byte_of_its_stream(
    stack: ApiStack, client: openai.OpenAI
) -> None:
    # More than the context window (MAX_CONTEXT) can hold: the runner refuses it before any work.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_CONTEXT + 1, stream=stream)
        assert err.value.code == "ContextLengthExceeded"
    with httpx.stream(
        "POST",
        stack.base_url + "/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": MAX_CONTEXT + 1, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as answer:
        assert answer.status_code == 400
        assert answer.headers["content-type"].startswith("application/json")
