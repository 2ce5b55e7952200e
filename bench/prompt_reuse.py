"""Prompt reuse benchmark: the first token of turn 5 of a conversation, with and without the
previous turns' cache.

One stack (nats-server, a supervisor, one runner, `exojet api`) serving the default model on
`--engine`. For each of `--repeat` conversations:
  - with reuse: turns 1-4 through the API (long user turns, each answer appended to the
    history), then turn 5 (a short question): its first token, streamed through the official
    `openai` client;
  - without: the same turn-5 messages under another system message, so no prefix of them was
    ever computed: the whole history is prefilled.
On llama.cpp, also the engine's own library in this process (xllamacpp's server engine with the
runner's parameters), the same two prompts. Prints medians and the ratios.

    .venv/bin/python bench/prompt_reuse.py [--engine llamacpp] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import openai
from loguru import logger

from bench.api_stack import serving
from bench.concurrency import streamed_chat
from exojet.models.smollm import DEFAULT_MODEL_ID
from exojet.runner.engine_choice import EngineWanted, choose_engine, installed_engines

# About 430 tokens a user turn: four of them and four answers make a ~2,000-token history.
NOTES = " ".join(
    f"Note {{c}}.{{t}}.{i}: the lighthouse keeper logged {i * 7} ships and {i % 5} storms." for i in range(24)
)
QUESTION = "In one sentence: what did the keeper log most?"
ANSWER_TOKENS = 48


class Turn5(msgspec.Struct):
    """The first token of turn 5 with the previous turns cached (warm) and without (cold)."""

    warm: float
    cold: float
    prompt_tokens: int


async def conversation(api: openai.AsyncOpenAI, model: str, c: int) -> tuple[Turn5, list[dict[str, str]]]:
    """Turns 1-4 of conversation `c`, then turn 5 warm and its cold twin."""
    messages = [{"role": "system", "content": f"You are the archivist of conversation {c}."}]
    for t in range(1, 5):
        messages.append({"role": "user", "content": NOTES.format(c=c, t=t) + " Summarise these notes."})
        answer = await api.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=ANSWER_TOKENS,
            temperature=0,
        )
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
    messages.append({"role": "user", "content": QUESTION})
    warm_chat = await streamed_chat(api, model, messages, 8)
    warm, prompt_tokens = warm_chat.first, warm_chat.prompt_tokens
    twin = [{"role": "system", "content": f"You are the cold archivist of conversation {c}."}, *messages[1:]]
    cold = (await streamed_chat(api, model, twin, 8)).first
    return Turn5(warm, cold, prompt_tokens), messages


async def conversations(base_url: str, model: str, count: int) -> list[tuple[Turn5, list[dict[str, str]]]]:
    api = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    done = [await conversation(api, model, c) for c in range(count)]
    await api.close()
    return done


class Direct:
    """xllamacpp's server engine in this process, with the runner's parameters."""

    def __init__(self, gguf: Path) -> None:
        import tempfile

        import xllamacpp

        from exojet.runner.engine_llamacpp import MAX_CONTEXT, gguf_facts, server_params

        context = min(MAX_CONTEXT, gguf_facts(gguf).context_length or MAX_CONTEXT)
        self.socket_dir = tempfile.TemporaryDirectory(prefix="bench-reuse-")
        self.server = xllamacpp.Server(server_params(gguf, context, Path(self.socket_dir.name) / "direct.sock"))

    def first_token(self, messages: list[dict[str, str]]) -> float:
        started = time.perf_counter()
        first = threading.Event()
        at = [0.0]

        def on_chunk(chunk: dict) -> bool:
            if not first.is_set() and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                at[0] = time.perf_counter() - started
                first.set()
            return False

        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
        self.server.handle_chat_completions(body, on_chunk)
        return at[0]


def main(engine: EngineWanted, repeat: int) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    model = DEFAULT_MODEL_ID
    with serving(model, engine) as served:
        done = asyncio.run(conversations(f"http://127.0.0.1:{served.port}/v1", model, repeat))
        exo = [turn5 for turn5, _ in done]
        histories = [messages for _, messages in done]
        direct: list[Turn5] = []
        if served.engine == "llamacpp":
            _, gguf = choose_engine(served.model_path, "llamacpp", installed_engines())
            lib = Direct(gguf)
            for c, messages in enumerate(histories):
                lib.first_token(messages[:-2])  # turn 4's prompt: the cache a runner would hold
                warm = lib.first_token(messages)
                cold = lib.first_token([{"role": "system", "content": f"Cold twin {c}."}, *messages[1:]])
                direct.append(Turn5(warm, cold, 0))
    tokens = statistics.median(t.prompt_tokens for t in exo)
    print(f"model {model} on {served.engine}; turn 5 of {repeat} conversations, ~{tokens:.0f} prompt tokens each")
    print("| path | turn 5 first token, reused | without reuse | speed-up |")
    print("|---|---|---|---|")
    for name, rows in (("exojet (API)", exo), ("engine library, direct", direct)):
        if rows:
            warm = statistics.median(t.warm for t in rows)
            cold = statistics.median(t.cold for t in rows)
            print(f"| {name} | {warm * 1000:.0f} ms | {cold * 1000:.0f} ms | {cold / warm:.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="llamacpp", choices=["llamacpp", "mlx"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    main(args.engine, args.repeat)
