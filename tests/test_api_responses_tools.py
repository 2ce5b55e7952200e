"""Function calling and structured output on OpenAI's Responses route, through the official `openai`
client (`client.responses.create`), on a real stack serving the tiny random llama on llama.cpp: a
forced call is a `function_call` item whose arguments validate against the function's parameters,
whole and streamed (its argument deltas join to the item's arguments, the items added and done in
OpenAI's order); the call and its `function_call_output` go back in `input`; a `json_schema` text
format's answer validates; a built-in tool is a 400 naming it before any byte of a stream."""

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

from tests import engine_contract as contract
from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import tools_stack

pytestmark = pytest.mark.timeout(180)

# The contract's tool, as a Responses client sends it (the function's fields flat on the tool).
WEATHER: dict[str, Any] = msgspec.to_builtins(contract.WEATHER.function) | {"type": "function", "strict": True}
PARAMETERS = WEATHER["parameters"]
ASK = "what is the weather in paris?"
NAMED = {"type": "function", "name": "get_weather"}
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}, "word": {"enum": ["yes", "no"]}},
    "required": ["answer", "word"],
    "additionalProperties": False,
}
# A forced greedy call: the same whole and streamed.
GREEDY_CALL: Any = {
    "model": MODEL,
    "input": ASK,
    "tools": [WEATHER],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "temperature": 0,
    "max_output_tokens": 200,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiStack]:
    yield from tools_stack(tmp_path_factory, tiny_model_dir, "llamacpp")


@pytest.fixture(scope="module")
def client(stack: ApiStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def _calls(output: list[Any]) -> list[Any]:
    calls = [item for item in output if item.type == "function_call"]
    for call in calls:
        assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
        assert call.status == "completed"
        jsonschema_rs.validate(PARAMETERS, json.loads(call.arguments))
    return calls


def test_a_forced_call_is_a_function_call_item_valid_against_the_parameters(client: openai.OpenAI) -> None:
    for choice in ("required", NAMED):
        response = client.responses.create(
            model=MODEL,
            input=ASK,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=choice,  # type: ignore[arg-type]
            parallel_tool_calls=False,
            max_output_tokens=200,
        )
        assert response.status == "completed", response
        [call] = _calls(response.output)
        assert response.output[-1] == call and response.output_text == ""
        assert response.tools[0].name == "get_weather" and response.parallel_tool_calls is False  # type: ignore[union-attr]


def test_a_streamed_call_is_added_its_arguments_in_deltas_then_done(client: openai.OpenAI) -> None:
    events = list(client.responses.create(stream=True, **GREEDY_CALL))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, done, completed = events[2], events[-2], events[-1]
    assert added.item.type == "function_call" and added.item.arguments == ""  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call] = _calls([done.item])  # type: ignore[union-attr]
    assert deltas == call.arguments == events[-3].arguments  # type: ignore[union-attr]
    assert call.id == added.item.id and call.call_id == added.item.call_id  # type: ignore[union-attr]
    assert completed.response.output == [call]  # type: ignore[union-attr]
    # Greedy: the whole answer is the same call.
    whole = client.responses.create(**GREEDY_CALL)
    [same] = _calls(whole.output)
    assert (same.name, same.arguments) == (call.name, call.arguments)


def test_a_calls_output_goes_back_in_the_input(client: openai.OpenAI) -> None:
    ask: list[Any] = [{"role": "user", "content": ASK}]
    first = client.responses.create(
        model=MODEL,
        input=ask,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_output_tokens=200,  # type: ignore[list-item, arg-type]
    )
    calls = _calls(first.output)
    # The output items as they came (the client's own models), then each call's output.
    turn = [*ask, *(item.model_dump(exclude_none=True) for item in first.output)]
    turn += [{"type": "function_call_output", "call_id": c.call_id, "output": '{"sky": "clear"}'} for c in calls]
    second = client.responses.create(model=MODEL, input=turn, tools=[WEATHER], max_output_tokens=16)  # type: ignore[list-item]
    assert second.status in ("completed", "incomplete")
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    # A call's arguments that are not JSON are named.
    broken = [*ask, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{oops"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=broken, tools=[WEATHER], max_output_tokens=16)  # type: ignore[list-item, arg-type]
    assert err.value.body["param"] == "input[1].arguments"  # type: ignore[index]


def test_a_json_schema_format_answer_validates_whole_and_streamed(client: openai.OpenAI) -> None:
    fmt: Any = {"format": {"type": "json_schema", "name": "count", "schema": SCHEMA, "strict": True}}
    ask = "how many cats? JSON please"
    whole = client.responses.create(model=MODEL, input=ask, text=fmt, max_output_tokens=200)
    assert whole.status == "completed" and whole.text.format.type == "json_schema"  # type: ignore[union-attr]
    jsonschema_rs.validate(SCHEMA, json.loads(whole.output_text))
    events = list(client.responses.create(model=MODEL, input=ask, text=fmt, max_output_tokens=200, stream=True))
    assert events[-1].type == "response.completed"
    jsonschema_rs.validate(SCHEMA, json.loads(events[-1].response.output_text))  # type: ignore[union-attr]
    any_object = client.responses.create(
        model=MODEL, input=ask, text={"format": {"type": "json_object"}}, max_output_tokens=200
    )
    # Any object: the random model's may run to the length (its strings are unbounded), but it is one.
    assert any_object.output_text.startswith("{")
    if any_object.status == "completed":
        assert isinstance(json.loads(any_object.output_text), dict)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, None),
    ],
)
def test_what_cannot_be_done_is_a_400_before_any_byte_of_a_stream(
    stack: ApiStack, extra: dict[str, Any], param: str | None
) -> None:
    for stream in (False, True):
        with httpx.stream(
            "POST",
            stack.base_url + "/responses",
            json={"model": MODEL, "input": ASK, "max_output_tokens": 16, "stream": stream} | extra,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        ) as answer:
            answer.read()
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"].startswith("application/json")
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, error
