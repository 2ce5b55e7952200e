"""What logprobs and n cost through the engine (issue 30, item 3), each against plain decoding in the
same run: the default model in exojet's engine child (`runner.engine.Engine`), a greedy story of
`--tokens` tokens, `--repeat` times each, the median's tokens a second and the ratio to plain:

- plain, then `logprobs` with `top_logprobs` 20 (the most OpenAI allows);
- `n` 4 as one task against 4 chats sent at once, tokens of all answers over the wall time: the
  prompt is computed once (llama.cpp copies it to 4 slots; MLX copies choice 0's KV cache to the
  other 3 rows); and the same pair on a long prompt (`--long-words` words) with `--long-tokens`
  tokens, where that saving shows.

    .venv/bin/python bench/logprobs.py [--tokens 64] [--repeat 3] [--engines llamacpp,mlx]
        [--long-words 600] [--long-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exojet.bus.sampling import Sampling
from exojet.models.smollm import GGUF_NAME, ensure_default_model
from exojet.runner.engine import Engine
from exojet.runner.engine_protocol import Done, Generate, Message

ASK = [Message(role="user", content="Write a long story about a lighthouse keeper and the sea.")]


async def tokens_per_second(engine: Engine, reqs: list[Generate]) -> float:
    """All the requests' completion tokens over the wall time they took together."""
    started = time.perf_counter()

    async def one(req: Generate) -> int:
        async for reply in engine.generate(req):
            if isinstance(reply, Done):
                return reply.completion_tokens
        raise AssertionError("no Done")

    counts = await asyncio.gather(*(one(r) for r in reqs))
    return sum(counts) / (time.perf_counter() - started)


async def run(engine_name: str, model: Path, args: argparse.Namespace) -> None:
    tokens, repeat = args.tokens, args.repeat
    # A long prompt of distinct words, so no prefix of it is cached from another case.
    long_ask = [Message(role="user", content=" ".join(f"word{i}" for i in range(args.long_words)))]
    engine = Engine(engine_name)
    await engine.start()
    try:
        await engine.load(str(model))
        await engine.warmup()
        plain = Generate(messages=ASK, sampling=Sampling(max_tokens=tokens))
        cases: dict[str, list[Generate]] = {
            "plain": [plain],
            "logprobs, top 20": [
                Generate(messages=ASK, sampling=Sampling(max_tokens=tokens, logprobs=True, top_logprobs=20))
            ],
            "4 chats at once": [plain] * 4,
            "n=4, one task": [Generate(messages=ASK, sampling=Sampling(max_tokens=tokens, n=4))],
            "4 chats at once, long prompt": [
                Generate(messages=long_ask, sampling=Sampling(max_tokens=args.long_tokens, seed=i)) for i in range(4)
            ],
            "n=4, one task, long prompt": [
                Generate(messages=long_ask, sampling=Sampling(max_tokens=args.long_tokens, n=4, seed=0))
            ],
        }
        rates = {}
        for name, reqs in cases.items():
            samples = [await tokens_per_second(engine, reqs) for _ in range(repeat)]
            print(engine_name, name, [round(s, 1) for s in samples], flush=True)
            rates[name] = statistics.median(samples)
        for name, rate in rates.items():
            against = name.replace("n=4, one task", "4 chats at once") if name.startswith("n=") else "plain"
            print(f"{engine_name:9} {name:28} {rate:8.1f} tok/s   x{rate / rates[against]:.2f} of {against}")
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="llamacpp,mlx")
    parser.add_argument("--long-words", type=int, default=600)
    parser.add_argument("--long-tokens", type=int, default=8)
    args = parser.parse_args()
    folder = ensure_default_model(Path(tempfile.gettempdir()) / "exojet-bench-models")
    for name in args.engines.split(","):
        asyncio.run(run(name, folder / GGUF_NAME if name == "llamacpp" else folder, args))


if __name__ == "__main__":
    main()
