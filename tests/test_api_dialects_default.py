"""Every API dialect on the real default model (SmolLM2) under `exojet up`, each through its official client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import jsonschema_rs
import ollama
import openai
import pytest

from exojet.bus.ops.server import free_port
from tests.up_process import interrupt, start_up, wait_ready

pytestmark = pytest.mark.timeout(300)

QUESTION = "What is the capital of France?"
# A tool as the `ollama` client sends it (its Tool model keeps a property's type, enum, description).
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}


def test_each_dialect_answers_paris_on_the_default_model(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    up = start_up(tmp_path, port, tmp_path / "up.log", api_port)
    try:
        wait_ready(up)
        host = f"http://127.0.0.1:{api_port}"
        chat = openai.OpenAI(base_url=f"{host}/v1", api_key="unused", max_retries=0, timeout=120)
        model = chat.models.list().data[0].id
        user = [{"role": "user", "content": QUESTION}]
        expected = chat.chat.completions.create(model=model, messages=user, max_tokens=30, temperature=0)  # type: ignore[arg-type]
        text = expected.choices[0].message.content
        assert text is not None and "Paris" in text

        claude = anthropic.Anthropic(base_url=host, api_key="unused", max_retries=0, timeout=120)
        message = claude.messages.create(model=model, max_tokens=30, messages=user)  # type: ignore[arg-type]
        assert message.content[0].text == text  # type: ignore[union-attr]
        with claude.messages.stream(model=model, max_tokens=30, messages=user) as stream:  # type: ignore[arg-type]
            assert "".join(stream.text_stream) == text
        _anthropic_tools_and_json(claude, model)

        llama = ollama.Client(host=host, timeout=120)
        assert [m.model for m in llama.list().models] == [model]
        assert llama.chat(model=model, messages=user, options={"num_predict": 30}).message.content == text
        parts = llama.chat(model=model, messages=user, options={"num_predict": 30}, stream=True)
        assert "".join(p.message.content or "" for p in parts) == text

        response = chat.responses.create(model=model, input=QUESTION, max_output_tokens=30)
        assert response.output_text == text
        # No chat template: the model continues the text.
        completion = chat.completions.create(model=model, prompt="The capital of France is", max_tokens=8)
        assert "Paris" in completion.choices[0].text
    finally:
        assert interrupt(up) == 0


def _anthropic_tools_and_json(claude: anthropic.Anthropic, model: str) -> None:
    """A forced tool_use, its tool_result turn and a JSON format on the default model's own chat
    template (the tiny model's hides what a real template does with the tools' messages)."""
    weather: Any = {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    single: Any = {"type": "any", "disable_parallel_tool_use": True}
    called = claude.messages.create(model=model, max_tokens=200, messages=ask, tools=[weather], tool_choice=single)
    [use] = called.content
    assert called.stop_reason == "tool_use" and use.type == "tool_use", called
    assert use.name == "get_weather" and use.input["city"] == "Paris"  # type: ignore[index]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 24 C"}
    history = [
        *ask,
        {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
        {"role": "user", "content": [result]},
    ]
    answered = claude.messages.create(model=model, max_tokens=8, messages=history, tools=[weather])
    assert answered.usage.input_tokens > called.usage.input_tokens + 10
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    capital = claude.messages.create(
        model=model,
        max_tokens=60,
        messages=[{"role": "user", "content": "Give the capital of France as JSON"}],
        output_config={"format": {"type": "json_schema", "schema": schema | {"additionalProperties": False}}},
    )
    [text] = capital.content
    assert capital.stop_reason == "end_turn" and json.loads(text.text) == {"capital": "Paris"}  # type: ignore[union-attr]


def test_ollamas_and_responses_tool_calls_on_the_default_model(tmp_path: Path) -> None:
    """SmolLM2 calls the tool it is given (its template has no tools: the generic tool prompt),
    once, whole and in one streamed line, and takes its result back (found here: without one call
    an answer it called again and again until its length, and the cut answer came as words); and
    the same through OpenAI's Responses route. A stack of its own: the test above fills its time
    bound on this shared machine."""
    port, api_port = free_port(), free_port()
    up = start_up(tmp_path, port, tmp_path / "up.log", api_port)
    try:
        wait_ready(up)
        host = f"http://127.0.0.1:{api_port}"
        llama = ollama.Client(host=host, timeout=120)
        [model] = [m.model for m in llama.list().models]
        assert model
        _ollama_tools(llama, model)
        _responses_tools(openai.OpenAI(base_url=f"{host}/v1", api_key="unused", max_retries=0, timeout=120), model)
    finally:
        assert interrupt(up) == 0


def _ollama_tools(llama: ollama.Client, model: str) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    options = {"temperature": 0, "num_predict": 100}
    answer = llama.chat(model=model, messages=ask, tools=[WEATHER], options=options)
    assert answer.done_reason == "stop" and answer.message.tool_calls
    [call] = answer.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema_rs.validate(PARAMETERS, dict(call.function.arguments))
    assert call.function.arguments["city"] == "Paris"
    parts = list(llama.chat(model=model, messages=ask, tools=[WEATHER], options=options, stream=True))
    assert [p.message.tool_calls for p in parts if p.message.tool_calls] == [[call]]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    result = {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}
    second = llama.chat(model=model, messages=[*ask, answer.message, result], tools=[WEATHER], options=options)
    assert second.done and second.prompt_eval_count and answer.prompt_eval_count
    assert second.prompt_eval_count > answer.prompt_eval_count


def _responses_tools(chat: openai.OpenAI, model: str) -> None:
    """A forced call as a `function_call` item, whole and streamed alike, and its output back in `input`."""
    function: Any = WEATHER["function"]
    tool = function | {"type": "function", "strict": True}
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced: Any = {"model": model, "input": ask, "tools": [tool], "tool_choice": "required", "temperature": 0}
    called = chat.responses.create(**forced, max_output_tokens=100)
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather", called
    arguments = json.loads(call.arguments)
    jsonschema_rs.validate(PARAMETERS, arguments)
    assert arguments["city"] == "Paris"
    events = list(chat.responses.create(**forced, max_output_tokens=100, stream=True))
    completed = events[-1]
    assert completed.type == "response.completed"
    [streamed] = completed.response.output
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}
    turn = [*ask, call.model_dump(exclude_none=True), result]
    answered = chat.responses.create(model=model, input=turn, tools=[tool], max_output_tokens=16)
    assert answered.status in ("completed", "incomplete")
    assert answered.usage is not None and called.usage is not None
    assert answered.usage.input_tokens > called.usage.input_tokens + 5
