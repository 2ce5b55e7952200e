"""One rank of a pipeline-parallel generation, launched by tests/test_pipeline.py.

Prints JSON lines on stdout: ``{"event": "loaded", ...}`` once the shard is in
memory, ``{"event": "generating"}`` after the first token and
``{"event": "done", ...}`` with the tokens and measurements. With
``--world-size 1`` it runs plain mlx-lm on the whole model (the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx
import psutil
from mlx_lm import load, stream_generate

from exojet.runner.pipeline import StallWatchdog, load_shard, pipeline_barrier
from exojet.runner.ring import connect_group


def emit(event: str, **fields: object) -> None:
    """One JSON line on stdout, flushed so the test sees it at once."""
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    """Join the group, load the shard, generate greedily, report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--hosts", default="", help="comma-separated ip:port, one per rank")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=0)
    parser.add_argument("--prompt", default="hello world")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--connect-timeout", type=float, default=20.0)
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    args = parser.parse_args()

    group = None
    if args.world_size == 1:
        model, tokenizer = load(args.model)
    else:
        group, _refused = connect_group(
            "test-group",
            args.world_size,
            args.rank,
            args.hosts.split(","),
            args.connect_timeout,
        )
        model, tokenizer = load_shard(args.model, group, args.start, args.end, lambda _done, _total: None)
    emit(
        "loaded",
        rank=args.rank,
        active_memory=mx.get_active_memory(),
        layers=len(model.layers),
        caches=len(model.make_cache()),
    )
    if args.ignore_eos:
        tokenizer.eos_token_ids = []

    tokens: list[int] = []
    text = ""
    first_token_at = 0.0
    with StallWatchdog(args.stall_timeout) as watchdog:
        for response in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens):
            watchdog.beat()
            if not tokens:
                first_token_at = time.perf_counter()
                emit("generating")
            tokens.append(response.token)
            text += response.text
    ended = time.perf_counter()
    if group is not None:
        pipeline_barrier(group)
    decode_tokens = len(tokens) - 1
    emit(
        "done",
        rank=args.rank,
        tokens=tokens,
        text=text,
        decode_tokens_per_s=decode_tokens / (ended - first_token_at) if decode_tokens else 0.0,
        peak_memory=mx.get_peak_memory(),
        rss=psutil.Process().memory_info().rss,
    )


if __name__ == "__main__":
    main()
