"""Tool use and JSON output in Anthropic's Messages dialect, through the official `anthropic`
client, on a real stack serving the tiny random llama on each engine (llama.cpp, MLX): a call
forced by tool_choice any or tool is a tool_use block valid against its input_schema, whole and
streamed (the input_json_delta fragments join to the input), a tool_result goes back in the
history, a JSON format's answer parses and validates, and a bad tool definition is a named 400 in
Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema_rs
import msgspec
import pytest

from exojet.runner.engine_llamacpp import MAX_CONTEXT
from tests import engine_contract as contract
from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import tools_stack

pytestmark = pytest.mark.timeout(180)

# The contract's tool, as an Anthropic client sends it.
_FUNCTION: dict[str, Any] = msgspec.to_builtins(contract.WEATHER.function)
WEATHER: dict[str, Any] = {"name": _FUNCTION["name"], "input_schema": _FUNCTION["parameters"]}
ASK: list[Any] = [{"role": "user", "content": "what is the weather in paris?"}]
NONSENSE = {"type": "object", "properties": {"x": {"type": "nonsense"}}}
# Greedy: the same chat whole and streamed is the same answer.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ApiStack]:
    yield from tools_stack(tmp_path_factory, tiny_model_dir, request.param)


@pytest.fixture(scope="module")
def claude(stack: ApiStack) -> anthropic.Anthropic:
    # The client adds /v1 itself.
    return anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key=API_KEY, max_retries=0, timeout=120)


def _valid_use(block: Any) -> dict[str, Any]:
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather"
    jsonschema_rs.validate(WEATHER["input_schema"], block.input)
    return dict(block.input)


def test_tool_choice_any_or_a_named_tool_answers_tool_use_blocks_valid_against_the_schema(
    claude: anthropic.Anthropic,
) -> None:
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}):
        message = claude.messages.create(
            model=MODEL,
            max_tokens=200,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=choice,  # type: ignore[arg-type]
        )
        assert message.stop_reason == "tool_use", message
        uses = [b for b in message.content if b.type == "tool_use"]
        assert uses and all(b.type == "text" for b in message.content[: -len(uses)])
        for block in uses:
            _valid_use(block)
        if choice["type"] == "tool":
            assert len(uses) == 1  # disable_parallel_tool_use


def test_a_streamed_call_is_a_tool_use_block_whose_json_deltas_join_to_the_whole_input(
    stack: ApiStack, claude: anthropic.Anthropic
) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 200,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    whole = claude.messages.create(**ask, extra_body=GREEDY)
    with claude.messages.stream(**ask, extra_body=GREEDY) as stream:
        fragments = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert json.loads("".join(fragments)) == _valid_use(use)
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        (b.type, getattr(b, "input", None)) for b in whole.content
    ]

    # The events in Anthropic's order (read raw): the block starts with its id, name and input {}.
    with httpx.stream(
        "POST", f"{stack.base_url}/messages", json=ask | GREEDY | {"stream": True}, headers={"x-api-key": API_KEY}
    ) as raw:
        events = [json.loads(line.removeprefix("data: ")) for line in raw.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    [start] = [e for e in events if e["type"] == "content_block_start"]
    block = start["content_block"]
    assert block == {"type": "tool_use", "id": block["id"], "name": "get_weather", "input": {}}
    assert block["id"].startswith("toolu_")
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == use.input
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_a_tool_result_goes_back_in_the_history(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(
        model=MODEL, max_tokens=200, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"}
    )
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                *({"type": "tool_result", "tool_use_id": b.id, "content": '{"sky": "clear"}'} for b in uses),
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    second = claude.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens > first.usage.input_tokens
    # The same turn counted alike; a failed tool's result too.
    counted = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    assert counted.input_tokens == second.usage.input_tokens
    history[-1]["content"][0]["is_error"] = True
    failed = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    assert failed.input_tokens > counted.input_tokens


def test_a_json_format_answer_parses_and_validates(claude: anthropic.Anthropic) -> None:
    schema = contract.ANSWER_SCHEMA
    for stream in (False, True):
        ask: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 200,
            "messages": [{"role": "user", "content": "how many cats? JSON please"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        }
        if stream:
            with claude.messages.stream(**ask) as streamed:
                message = streamed.get_final_message()
        else:
            message = claude.messages.create(**ask)
        assert message.stop_reason == "end_turn"
        [text] = message.content
        assert text.type == "text"
        jsonschema_rs.validate(schema, json.loads(text.text))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [WEATHER, WEATHER]}, "tools: two tools have the same name"),
        ({"tools": [WEATHER | {"name": "get.weather"}]}, "tools[0].name"),
        ({"tools": [{"name": "f"}]}, "input_schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "tools.0.input_schema.type: must be 'object'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type: server tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope', which is not among"),
        ({"tool_choice": {"type": "any"}}, "tool_choice: only allowed when tools are given"),
        # A schema LLGuidance cannot compile: the runner's refusal, before any token.
        ({"tools": [{"name": "f", "input_schema": NONSENSE}]}, "does not compile"),
    ],
)
def test_a_bad_tool_definition_is_a_named_400_in_anthropics_shape(
    claude: anthropic.Anthropic, extra: dict[str, Any], words: str
) -> None:
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as err:
            claude.messages.create(model=MODEL, max_tokens=4, messages=ASK, stream=stream, **extra)
        body: Any = err.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert words in body["error"]["message"], body


def test_a_chat_the_model_cannot_take_is_a_400_before_any_byte_of_its_stream(stack: ApiStack) -> None:
    # More than the context window can hold: the runner refuses it before any work.
    body = {"model": MODEL, "max_tokens": MAX_CONTEXT + 1, "messages": ASK, "tools": [WEATHER], "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/messages", json=body, headers={"x-api-key": API_KEY}) as answer:
        assert answer.status_code == 400
        assert answer.headers["content-type"].startswith("application/json")
        error = json.loads(answer.read())
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert "ContextLengthExceeded" in error["error"]["message"]
