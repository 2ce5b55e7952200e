"""Dialects benchmark: each API dialect's first token and tokens/s against OpenAI's chat route.

One stack (nats-server, a supervisor, a runner with the model placed, `exojet api`), the same
greedy chat streamed through each dialect's official client: OpenAI chat completions (the
baseline), Anthropic Messages, Ollama's /api/chat, OpenAI Responses, and OpenAI completions
(a raw prompt, no chat template: a story's start, so another prompt, run once untimed
before each timed run so that llama.cpp's prompt cache holds it as it holds the others'). Paired runs:
each round runs every dialect once, in an order rotated each round so drift hits all alike.
Time to first token is from the call to the first text; decode speed is
(tokens - 1) / (last - first text). Prints each dialect's medians, the median of its per-round
first-token difference to the OpenAI route's, and of its tokens/s ratio (target: within 2 ms, 0.98x).

    .venv/bin/python bench/dialects.py [--model exojet/SmolLM2-135M-Instruct-Q4] [--engine auto]
        [--tokens 64] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic
import ollama
import openai
from loguru import logger

from bench.api_stack import serving
from bench.inference import with_engine_env
from exojet.models.smollm import DEFAULT_MODEL_ID
from exojet.runner.engine_choice import EngineWanted

PROMPT = "Write a short story about a lighthouse keeper."
# Completions continue text as given (no chat template): a story's start, not a request for one
# (the instruction above, untemplated, is often answered by an end of text at once).
STORY = "Once upon a time, an old lighthouse keeper lived alone on a rocky island. Every night he"
KEY = "bench"

# A dialect's run: its stream's (text arrival times, completion tokens).
Stream = Callable[[str, int], tuple[list[float], int]]


class Clients:
    def __init__(self, port: int) -> None:
        host = f"http://127.0.0.1:{port}"
        self.openai = openai.OpenAI(base_url=f"{host}/v1", api_key=KEY, max_retries=0, timeout=300)
        self.anthropic = anthropic.Anthropic(base_url=host, api_key=KEY, max_retries=0, timeout=300)
        self.ollama = ollama.Client(host=host, timeout=300)

    def chat(self, model: str, tokens: int) -> tuple[list[float], int]:
        arrivals, count = [], 0
        for chunk in self.openai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return arrivals, count

    def messages(self, model: str, tokens: int) -> tuple[list[float], int]:
        arrivals, count = [], 0
        for event in self.anthropic.messages.create(
            model=model, max_tokens=tokens, messages=[{"role": "user", "content": PROMPT}], stream=True
        ):
            if event.type == "content_block_delta":
                arrivals.append(time.perf_counter())
            elif event.type == "message_delta":
                count = event.usage.output_tokens
        return arrivals, count

    def ollama_chat(self, model: str, tokens: int) -> tuple[list[float], int]:
        arrivals, count = [], 0
        for part in self.ollama.chat(
            model=model, messages=[{"role": "user", "content": PROMPT}], options={"num_predict": tokens}, stream=True
        ):
            if part.message.content:
                arrivals.append(time.perf_counter())
            if part.done:
                count = part.eval_count or 0
        return arrivals, count

    def responses(self, model: str, tokens: int) -> tuple[list[float], int]:
        arrivals, count = [], 0
        for event in self.openai.responses.create(model=model, input=PROMPT, max_output_tokens=tokens, stream=True):
            if event.type == "response.output_text.delta":
                arrivals.append(time.perf_counter())
            elif event.type in ("response.completed", "response.incomplete") and event.response.usage:
                count = event.response.usage.output_tokens
        return arrivals, count

    def completions(self, model: str, tokens: int) -> tuple[list[float], int]:
        arrivals, count = [], 0
        for chunk in self.openai.completions.create(
            model=model, prompt=STORY, max_tokens=tokens, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return arrivals, count


def timed(stream: Stream, model: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first text, tokens/s after it) of one streamed chat."""
    started = time.perf_counter()
    arrivals, count = stream(model, tokens)
    decode = arrivals[-1] - arrivals[0]
    return arrivals[0] - started, (count - 1) / decode if decode else 0.0


def _rotated(names: list[str], by: int) -> Iterable[str]:
    return names[by % len(names) :] + names[: by % len(names)]


def main(model_id: str, tokens: int, repeat: int, wanted: EngineWanted) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with serving(model_id, wanted) as served:
        clients = Clients(served.port)
        dialects: dict[str, Stream] = {
            "openai chat": clients.chat,
            "anthropic": clients.messages,
            "ollama": clients.ollama_chat,
            "responses": clients.responses,
            "completions": clients.completions,
        }
        for stream in dialects.values():
            timed(stream, model_id, 16)  # warm up every route and client (16: Responses' least)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in dialects}
        for i in range(repeat):
            for name in _rotated(list(dialects), i):
                if name == "completions":
                    # Its prompt is another: once untimed, so the engine's prompt cache holds
                    # it as it holds the chat's for the others (else it alone pays a prefill).
                    dialects[name](model_id, tokens)
                runs[name].append(timed(dialects[name], model_id, tokens))

    base = runs["openai chat"]
    print(f"model {model_id} on {served.engine}, {tokens} tokens, greedy, {repeat} paired rounds (medians):")
    print(f"{'dialect':<12} {'first token':>12} {'tok/s':>8} {'first token - openai':>22} {'tok/s / openai':>15}")
    for name, got in runs.items():
        first = statistics.median(t for t, _ in got) * 1000
        rate = statistics.median(r for _, r in got)
        delta = statistics.median((t - b) * 1000 for (t, _), (b, _) in zip(got, base, strict=True))
        ratio = statistics.median(r / b if b else 0.0 for (_, r), (_, b) in zip(got, base, strict=True))
        print(f"{name:<12} {first:>10.1f}ms {rate:>8.1f} {delta:>+20.2f}ms {ratio:>14.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--engine", default="auto", choices=["auto", "mlx", "llamacpp"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with_engine_env()
    main(args.model, args.tokens, args.repeat, args.engine)
