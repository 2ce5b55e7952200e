"""Ollama's tools and `format` against OpenAI's: the same chat through each route's official client.

One stack (nats-server, a supervisor, a runner with the model placed, `exojet api`). Each round asks
both routes, in an order rotated each round, for the same greedy answer: a tool the model may call
(Ollama's `tools`; OpenAI's `tools` with no `tool_choice` and `parallel_tool_calls: false`, the
fields Ollama's route routes), whole and streamed, and an answer under a JSON schema (Ollama's
`format`, OpenAI's `response_format`). Each pair makes one routed chat: what differs is the
request's mapping and the answer's rendering (a call whole in one line, its arguments an object,
against `tool_calls` and their argument fragments). Prints each case's median seconds and the
median of its per-round ratio to the OpenAI route's (target: 1.00x within the noise).

    .venv/bin/python bench/ollama_tools.py [--engine auto] [--repeat 10]

on the default model (SmolLM2-135M-Instruct, Q4 on llama.cpp).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ollama
import openai

from bench.paired_routes import ASK, KEY, Case, bench_routes, timed_rounds

# What the ollama client sends of a schema (no additionalProperties): SmolLM2 adds keys of its own
# (copied from the schema), and with a bare `city` ran on with one until the answer's length; so it
# did without the tool's description or the unit's type (tests/test_api_dialects_default.py's tool).
PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
}
TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
# The tool as the ollama client sends it, for the OpenAI route: the client reorders a schema's keys
# (type, required, properties), and the generic tool prompt renders the schema's text, so with the
# tool as written the two routes prompted SmolLM2 differently (Ollama's called, OpenAI's ran on).
SENT: Any = ollama.Tool.model_validate(TOOL).model_dump(exclude_none=True)
CAPITAL: Any = [{"role": "user", "content": "Give the capital of France as JSON"}]
SCHEMA = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
TOKENS = 100


class Routes:
    """Each case on each route: Ollama's `/api/chat` and OpenAI's `/v1/chat/completions`."""

    def __init__(self, port: int) -> None:
        host = f"http://127.0.0.1:{port}"
        self.openai = openai.OpenAI(base_url=f"{host}/v1", api_key=KEY, max_retries=0, timeout=300)
        self.ollama = ollama.Client(host=host, timeout=300)

    def _openai(self, model: str, stream: bool, **shape: Any) -> Any:
        return self.openai.chat.completions.create(
            model=model, max_tokens=TOKENS, temperature=0, stream=stream, **shape
        )

    def _ollama(self, model: str, stream: bool, **shape: Any) -> Any:
        return self.ollama.chat(model=model, options={"temperature": 0, "num_predict": TOKENS}, stream=stream, **shape)

    def openai_call(self, model: str) -> Any:
        [call] = (
            self._openai(model, False, messages=ASK, tools=[SENT], parallel_tool_calls=False)
            .choices[0]
            .message.tool_calls
        )
        return json.loads(call.function.arguments)

    def ollama_call(self, model: str) -> Any:
        [call] = self._ollama(model, False, messages=ASK, tools=[TOOL]).message.tool_calls
        return dict(call.function.arguments)

    def openai_call_streamed(self, model: str) -> Any:
        chunks = self._openai(model, True, messages=ASK, tools=[SENT], parallel_tool_calls=False)
        pieces = [p for c in chunks for choice in c.choices for p in choice.delta.tool_calls or ()]
        return json.loads("".join(p.function.arguments or "" for p in pieces if p.function is not None))

    def ollama_call_streamed(self, model: str) -> Any:
        lines = self._ollama(model, True, messages=ASK, tools=[TOOL])
        [call] = [c for line in lines for c in line.message.tool_calls or ()]
        return dict(call.function.arguments)

    def openai_format(self, model: str) -> Any:
        fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}}
        return json.loads(self._openai(model, False, messages=CAPITAL, response_format=fmt).choices[0].message.content)

    def ollama_format(self, model: str) -> Any:
        return json.loads(self._ollama(model, False, messages=CAPITAL, format=SCHEMA).message.content)


def _rounds(routes: Routes, model_id: str, repeat: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each case's seconds per round and what each answered first (the same on both routes)."""
    names = ["call", "call_streamed", "format"]
    cases: dict[str, Case] = {}
    for name in names:
        cases[f"openai {name}"] = getattr(routes, f"openai_{name}")
        cases[f"ollama {name}"] = getattr(routes, f"ollama_{name}")
    answers = {name: case(model_id) for name, case in cases.items()}
    for name in names:
        assert answers[f"openai {name}"] == answers[f"ollama {name}"], answers
    return timed_rounds(cases, model_id, repeat), answers


if __name__ == "__main__":
    bench_routes(__doc__, lambda port, model_id, repeat: _rounds(Routes(port), model_id, repeat), repeat=10)
