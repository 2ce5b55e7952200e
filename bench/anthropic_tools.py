"""Anthropic's and OpenAI Responses' tool use against OpenAI chat's: the same forced call through
each route's official client.

One stack (nats-server, a supervisor, a runner with the model placed, `exojet api`); each round asks
for the same greedy call of one tool (`tool_choice` any with `disable_parallel_tool_use` on
/v1/messages, `required` with `parallel_tool_calls: false` on /v1/chat/completions and
/v1/responses), whole and streamed, in an order rotated each round so drift hits all alike. The
routes make one routed chat: what differs is the request's mapping and the answer's rendering
(tool_use blocks and input_json_delta events, function_call items and their argument deltas, against
tool_calls). Prints each case's median seconds to the whole call and the median of its per-round
ratio to the chat route's (target: 1.00x within the noise).

    .venv/bin/python bench/anthropic_tools.py [--engine auto] [--repeat 20]

on the default model (SmolLM2-135M-Instruct, Q4 on llama.cpp).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic
import openai

from bench.paired_routes import ASK, KEY, Case, bench_routes, timed_rounds

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
DESCRIPTION = "The weather in a city"
MAX_TOKENS = 200


class Clients:
    def __init__(self, port: int) -> None:
        host = f"http://127.0.0.1:{port}"
        self.openai = openai.OpenAI(base_url=f"{host}/v1", api_key=KEY, max_retries=0, timeout=300)
        self.anthropic = anthropic.Anthropic(base_url=host, api_key=KEY, max_retries=0, timeout=300)
        self.tool: Any = {"type": "function", "function": {"name": "get_weather", "description": DESCRIPTION}}
        self.tool["function"]["parameters"] = SCHEMA
        self.custom: Any = {"name": "get_weather", "description": DESCRIPTION, "input_schema": SCHEMA}
        self.function: Any = {"type": "function", "name": "get_weather", "description": DESCRIPTION}
        self.function |= {"parameters": SCHEMA, "strict": True}

    def _openai(self, model: str, stream: bool) -> Any:
        return self.openai.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[self.tool],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=stream,  # type: ignore[call-overload]
        )

    def openai_whole(self, model: str) -> dict[str, Any]:
        [call] = self._openai(model, False).choices[0].message.tool_calls
        return dict(json.loads(call.function.arguments))

    def openai_streamed(self, model: str) -> dict[str, Any]:
        arguments = "".join(
            piece.function.arguments or ""
            for chunk in self._openai(model, True)
            for choice in chunk.choices
            for piece in choice.delta.tool_calls or ()
            if piece.function is not None
        )
        return dict(json.loads(arguments))

    def _anthropic(self, model: str, stream: bool) -> Any:
        return self.anthropic.messages.create(
            model=model,
            messages=ASK,
            tools=[self.custom],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            max_tokens=MAX_TOKENS,
            stream=stream,
            # Sampling parameters: Anthropic's newer clients no longer name them.
            extra_body={"temperature": 0},
        )

    def anthropic_whole(self, model: str) -> dict[str, Any]:
        [use] = [b for b in self._anthropic(model, False).content if b.type == "tool_use"]
        return dict(use.input)

    def anthropic_streamed(self, model: str) -> dict[str, Any]:
        fragments = [
            e.delta.partial_json
            for e in self._anthropic(model, True)
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        return dict(json.loads("".join(fragments)))

    def _responses(self, model: str, stream: bool) -> Any:
        return self.openai.responses.create(
            model=model,
            input=ASK,
            tools=[self.function],
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=MAX_TOKENS,
            temperature=0,
            stream=stream,
        )

    def responses_whole(self, model: str) -> dict[str, Any]:
        [call] = [item for item in self._responses(model, False).output if item.type == "function_call"]
        return dict(json.loads(call.arguments))

    def responses_streamed(self, model: str) -> dict[str, Any]:
        deltas = [e.delta for e in self._responses(model, True) if e.type == "response.function_call_arguments.delta"]
        return dict(json.loads("".join(deltas)))


def _paired(clients: Clients, model_id: str, repeat: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each case's seconds per round (rounds in rotated orders) and the call each made first."""
    cases: dict[str, Case] = {
        "openai whole": clients.openai_whole,
        "anthropic whole": clients.anthropic_whole,
        "openai streamed": clients.openai_streamed,
        "anthropic streamed": clients.anthropic_streamed,
        "responses whole": clients.responses_whole,
        "responses streamed": clients.responses_streamed,
    }
    # Warm up every route and client; the same greedy call on every one.
    calls = {name: case(model_id) for name, case in cases.items()}
    assert len({json.dumps(c, sort_keys=True) for c in calls.values()}) == 1, calls
    return timed_rounds(cases, model_id, repeat), calls


if __name__ == "__main__":
    bench_routes(__doc__, lambda port, model_id, repeat: _paired(Clients(port), model_id, repeat), repeat=20)
