"""Paired rounds of one chat through two API routes: each case timed once a round, in an order
rotated each round so drift hits all alike, and reported beside its baseline route's case (the
median of the per-round ratios). For the benches that hold a dialect's route to OpenAI's chat
route on the same routed chat (bench/anthropic_tools.py, bench/ollama_tools.py)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from bench.api_stack import serving
from bench.inference import with_engine_env
from exojet.models.smollm import DEFAULT_MODEL_ID
from exojet.runner.engine_choice import EngineWanted

# A case's run on a model: what it answered (a warm-up run's answer is compared across routes).
Case = Callable[[str], Any]


def timed_rounds(cases: dict[str, Case], model_id: str, repeat: int) -> dict[str, list[float]]:
    """Each case's seconds per round, `repeat` rounds in rotated orders."""
    order = list(cases)
    seconds: dict[str, list[float]] = {name: [] for name in order}
    for i in range(repeat):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            started = time.perf_counter()
            cases[name](model_id)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def print_ratios(seconds: dict[str, list[float]], baseline: str = "openai") -> None:
    """Each case's median seconds and its median per-round ratio to the same case on `baseline`
    (a case named `<route> x` is compared with `<baseline> x`)."""
    print(f"{'case':<22} {'seconds':>9} {'/ ' + baseline:>9}")
    for name, got in seconds.items():
        base = seconds[f"{baseline} {name.split()[-1]}"]
        ratio = statistics.median(t / b for t, b in zip(got, base, strict=True))
        print(f"{name:<22} {statistics.median(got):>9.4f} {ratio:>8.3f}x")


# The routes' clients' key (the bench stack's API has none), and the question both tool benches ask.
KEY = "bench"
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
# Each bench's rounds on the stack's API port: each case's seconds per round, what each answered first.
Rounds = Callable[[int, str, int], tuple[dict[str, list[float]], dict[str, Any]]]


def bench_routes(doc: str | None, rounds: Rounds, repeat: int) -> None:
    """A bench's command line (`--engine`, `--repeat`): the default model served on one stack,
    `rounds` run on it, each case's figures beside the OpenAI route's."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="auto", choices=["auto", "mlx", "llamacpp"])
    parser.add_argument("--repeat", type=int, default=repeat)
    # The engine child's environment first (a re-execution with the same arguments).
    with_engine_env()
    args = parser.parse_args()
    wanted: EngineWanted = args.engine
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with serving(DEFAULT_MODEL_ID, wanted) as served:
        seconds, answers = rounds(served.port, DEFAULT_MODEL_ID, args.repeat)
    print(f"model {DEFAULT_MODEL_ID} on {served.engine}, {args.repeat} paired rounds (medians); answers {answers}:")
    print_ratios(seconds)
