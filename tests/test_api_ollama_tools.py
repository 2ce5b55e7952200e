"""Tools and `format` on Ollama's routes through the official `ollama` client, on a real stack serving
the tiny random llama on llama.cpp: a call's arguments (an object) validate against the tool's
schema, whole and streamed (each call whole in one line), a tool's result goes back in the history,
a `format` schema's answer parses and validates, `"json"` gives a JSON object, and what cannot be
done is Ollama's `{"error": ...}` with a 400 before any byte of a stream."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import jsonschema_rs
import ollama
import pytest

from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import ollama_client

pytestmark = pytest.mark.timeout(180)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Only what the client sends of a tool's schema: its Tool model keeps a property's type, enum and
# description, and drops other keywords (maxLength, additionalProperties ...), so the random model
# may add keys of its own: those end on some seeds.
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "unit": {"type": "string", "enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
ASK = [{"role": "user", "content": "what is the weather in paris?"}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}, "word": {"enum": ["yes", "no"]}},
    "required": ["answer", "word"],
    "additionalProperties": False,
}
# The random model answers in words or calls as its sampler draws (at temperature 2 it calls on
# a seed in a few): the seeds tried for each.
SEEDS = range(32)


@pytest.fixture(scope="module")
def llama(gguf_stack: ApiStack) -> ollama.Client:
    return ollama_client(gguf_stack, timeout=120)


def _options(seed: int) -> dict[str, Any]:
    return {"temperature": 2, "seed": seed, "num_predict": 100}


@pytest.fixture(scope="module")
def called(llama: ollama.Client) -> tuple[int, ollama.ChatResponse]:
    """The first seed whose answer calls the tool, and that answer; on the way, every answer that
    calls nothing is words (the model may answer either way: Ollama has no tool_choice)."""
    for seed in SEEDS:
        answer = llama.chat(model=MODEL, messages=ASK, tools=[WEATHER], options=_options(seed))
        if answer.message.tool_calls:
            return seed, answer
        assert answer.done_reason in ("stop", "length") and answer.message.content
    raise AssertionError(f"no seed of {SEEDS} made the tiny model call its tool")


def _arguments(call: ollama.Message.ToolCall) -> dict[str, Any]:
    assert call.function.name == "get_weather"
    arguments = dict(call.function.arguments)
    jsonschema_rs.validate(PARAMETERS, arguments)
    return arguments


def test_a_call_has_arguments_valid_against_the_tools_schema(called: tuple[int, ollama.ChatResponse]) -> None:
    _, answer = called
    assert answer.done and answer.done_reason == "stop"
    assert answer.message.role == "assistant" and answer.message.tool_calls
    for call in answer.message.tool_calls:
        _arguments(call)


def test_a_streamed_call_comes_whole_in_one_line(llama: ollama.Client, called: tuple[int, ollama.ChatResponse]) -> None:
    seed, whole = called
    parts = list(llama.chat(model=MODEL, messages=ASK, tools=[WEATHER], options=_options(seed), stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and not parts[-1].message.tool_calls
    with_calls = [p for p in parts if p.message.tool_calls]
    assert with_calls, "no line carried the call"
    streamed = [c for p in with_calls for c in p.message.tool_calls or ()]
    assert [(c.function.name, _arguments(c)) for c in streamed] == [
        (c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or ()
    ]


def test_a_tools_result_goes_back_in_the_history(llama: ollama.Client, called: tuple[int, ollama.ChatResponse]) -> None:
    _, first = called
    calls = first.message.tool_calls or []
    history: list[Any] = [
        *ASK,
        first.message,
        *({"role": "tool", "content": '{"sky": "clear"}', "tool_name": c.function.name} for c in calls),
    ]
    second = llama.chat(model=MODEL, messages=history, tools=[WEATHER], options={"num_predict": 8})
    assert second.done and second.done_reason in ("stop", "length")
    assert second.prompt_eval_count and first.prompt_eval_count
    assert second.prompt_eval_count > first.prompt_eval_count


def test_a_format_schemas_answer_parses_and_validates(llama: ollama.Client) -> None:
    ask = [{"role": "user", "content": "how many cats? JSON please"}]
    answer = llama.chat(model=MODEL, messages=ask, format=SCHEMA, options={"num_predict": 200})
    assert answer.done_reason == "stop"
    text = answer.message.content or ""
    jsonschema_rs.validate(SCHEMA, json.loads(text))
    parts = list(llama.chat(model=MODEL, messages=ask, format=SCHEMA, options={"num_predict": 200}, stream=True))
    assert "".join(p.message.content or "" for p in parts) == text
    generated = llama.generate(model=MODEL, prompt="how many cats?", format=SCHEMA, options={"num_predict": 200})
    jsonschema_rs.validate(SCHEMA, json.loads(generated.response))


def test_format_json_is_a_json_object(llama: ollama.Client) -> None:
    # Any object: the random model's keys may run to the answer's length; those that end parse.
    ended = []
    for seed in SEEDS[:8]:
        answer = llama.generate(model=MODEL, prompt="hi", format="json", options=_options(seed) | {"num_predict": 60})
        assert answer.response.startswith("{")
        if answer.done_reason == "stop":
            ended.append(json.loads(answer.response))
    assert ended and all(isinstance(a, dict) for a in ended)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"format": "xml"}, "format"),
        ({"format": "json", "tools": [WEATHER]}, "tools and format cannot both shape one answer"),
        ({"tools": [WEATHER, WEATHER]}, "two tools have the same name"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
            "arguments",
        ),
        ({"format": {"type": "nonsense"}}, "the JSON schema does not compile"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "schema"),
    ],
)
def test_what_cannot_be_done_is_a_named_400_before_any_byte_of_a_stream(
    gguf_stack: ApiStack, extra: dict[str, Any], words: str
) -> None:
    host = gguf_stack.base_url.removesuffix("/v1")
    for stream in (False, True):
        body = {"model": MODEL, "messages": ASK, "stream": stream, "options": {"num_predict": 8}} | extra
        with httpx.stream("POST", f"{host}/api/chat", json=body, headers=AUTH, timeout=60) as answer:
            answer.read()
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"].startswith("application/json")
            assert words in answer.json()["error"], answer.json()
