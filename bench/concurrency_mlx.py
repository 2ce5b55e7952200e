"""The MLX part of bench/concurrency.py: B chats at once through exojet (a runner on MLX), against
mlx-lm's own `batch_generate` and `mlx_lm.server`, in one run on the same weights and BLAS.

- exojet: the stack of `bench.api_stack.serving` with the runner on MLX (the model's weights made
  dense float32 in memory, the engine child given OpenBLAS: `runner/mlx_cpu.py`), B streamed chats
  at once through the official `openai` client;
- batch_generate: mlx-lm's `batch_generate` in this process on those weights (this process runs
  with the engine child's environment, its BLAS preloaded), the same B chat prompts at once;
- mlx_lm.server: mlx-lm's own server in a child process with the engine child's environment, on
  the same weights written dense float32 once (`mlx_lm.convert --dequantize --dtype float32`),
  B streamed chats at once through the same client; as users run it, and a second one with its
  prompt cache off (`--prompt-cache-size 0`): the chat template's system prompt and the prompts'
  shared words are a prefix it reuses across chats (exojet reuses no prompt yet), so the second
  compares batching alone.
Sizes alternate so machine drift hits the paths alike; each size of each repeat asks new prompts
(mlx_lm.server keeps an LRU prompt cache, which would otherwise skip a repeated prompt's prefill).
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import openai

from bench.api_stack import serving
from bench.concurrency import PROMPT, Batch, _pct, api_batch
from exojet.bus.ops.server import free_port
from exojet.runner.mlx_cpu import child_env, find_blas

# Prompts of a repeat are numbered from repeat * REPEAT_OFFSET, of its k-th size from k * SIZE_OFFSET
# (new prompts each time).
REPEAT_OFFSET = 1000
SIZE_OFFSET = 100
# Per path (exo, direct, server, uncached), per size: each repeat's batch.
Runs = dict[str, dict[int, list[Batch]]]
# Per API path: its client and the model name it serves.
Apis = dict[str, tuple[openai.AsyncOpenAI, str]]


def dense_copy(model_path: Path, dest: Path) -> Path:
    """The model's weights as the runner runs them on a CPU (dense float32), written by mlx-lm's
    own converter for the peers that load a folder."""
    from mlx_lm.convert import convert

    convert(str(model_path), str(dest), dequantize=True, dtype="float32")
    return dest


class BatchGenerate:
    """mlx-lm's `batch_generate` in this process on `path`'s weights."""

    def __init__(self, path: Path) -> None:
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(str(path))

    def batch(self, size: int, max_tokens: int, offset: int) -> Batch:
        """`size` chat prompts at once (no first tokens: `batch_generate` returns at the end)."""
        from mlx_lm.generate import batch_generate

        prompts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT.format(offset + i)}], add_generation_prompt=True
            )
            for i in range(size)
        ]
        started = time.perf_counter()
        done = batch_generate(self.model, self.tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
        wall = time.perf_counter() - started
        return Batch(sum(len(t) for t in done.token_ids or []), wall, [])


@contextmanager
def mlx_lm_server(path: Path, log_path: Path, *options: str, timeout: float = 120.0) -> Iterator[str]:
    """`mlx_lm.server` on `path` (its default concurrency: 32 decoding, 8 prefilling) with the
    engine child's BLAS and `options`, its output to `log_path`; yields its OpenAI base URL."""
    port = free_port()
    with log_path.open("w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--port", str(port), *options],
            stdout=log,
            stderr=log,
            env=child_env(find_blas()),
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlx_lm.server did not start: {log.read().decode()[-2000:]}")
                time.sleep(0.2)  # poll interval while the server loads
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait(30)


def main(model_id: str, max_tokens: int, repeat: int, sizes: list[int]) -> None:
    with serving(model_id, "mlx") as served, tempfile.TemporaryDirectory() as tmp:
        dense = dense_copy(served.model_path, Path(tmp) / "dense")
        direct = BatchGenerate(dense)
        logs = {"server": Path(tmp) / "server.log", "uncached": Path(tmp) / "uncached.log"}
        with (
            mlx_lm_server(dense, logs["server"]) as server,
            mlx_lm_server(dense, logs["uncached"], "--prompt-cache-size", "0") as uncached,
        ):
            apis = {
                name: (openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600), served_id)
                for name, url, served_id in (
                    ("exo", f"http://127.0.0.1:{served.port}/v1", model_id),
                    ("server", server, "default_model"),
                    ("uncached", uncached, "default_model"),
                )
            }
            results, failures = asyncio.run(_measure(apis, direct, max_tokens, repeat, sizes, logs))
    _report(model_id, max_tokens, repeat, sizes, results)
    for failure in failures:
        print(f"failed: {failure}")


async def _measure(
    apis: Apis, direct: BatchGenerate, max_tokens: int, repeat: int, sizes: list[int], logs: dict[str, Path]
) -> tuple[Runs, list[str]]:
    """Per repeat, per size: each API's batch, then batch_generate's right after exojet's; and the
    batches that failed, each naming its server (the medians are of those that did not)."""
    warm = REPEAT_OFFSET * (repeat + 1)
    # Warm all up (kernels, a server's first request).
    for api, served_id in apis.values():
        await api_batch(api, served_id, 2, 8, offset=warm)
    direct.batch(2, 8, warm)
    runs: Runs = {name: {b: [] for b in sizes} for name in ("exo", "direct", "server", "uncached")}
    failures: list[str] = []
    for r in range(repeat):
        for k, size in enumerate(sizes):
            offset = REPEAT_OFFSET * r + SIZE_OFFSET * k
            for name, (api, served_id) in apis.items():
                try:
                    runs[name][size].append(await api_batch(api, served_id, size, max_tokens, offset))
                except openai.APIError as err:
                    # Say which server dropped it (an APIConnectionError names no peer), with its last words.
                    said = logs[name].read_text(errors="replace").strip().splitlines()[-3:] if name in logs else []
                    failures.append(f"{name}, {size} chats at once: {err!r} ({err.__cause__!r}); its log: {said}")
                    if name == "exo":
                        raise
                if name == "exo":
                    runs["direct"][size].append(await asyncio.to_thread(direct.batch, size, max_tokens, offset))
    for api, _ in apis.values():
        await api.close()
    return runs, failures


def _median_tps(batches: list[Batch]) -> float:
    # NaN where every batch failed (listed after the table).
    return statistics.median(b.tokens_per_second for b in batches) if batches else math.nan


def _report(model_id: str, max_tokens: int, repeat: int, sizes: list[int], runs: Runs) -> None:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"model {model_id} on MLX (dense float32, {find_blas().library or 'MLX BLAS'}), {max_tokens} tokens a chat, "
        f"greedy, median of {repeat}; load average {load}"
    )
    print(
        f"{'B':>3} | tok/s: {'exojet':>6} | {'batch_gen':>9} | {'server':>6} | {'uncached':>8} | "
        "exo/bg | exo/server | exo/uncached | first p50/p99 ms: exojet | server | uncached"
    )
    for size in sizes:
        tps = {name: _median_tps(runs[name][size]) for name in runs}
        firsts = {name: [f for b in runs[name][size] for f in b.first_tokens] for name in ("exo", "server", "uncached")}
        first = {
            name: f"{_pct(f, 0.5) * 1000:5.0f} / {_pct(f, 0.99) * 1000:5.0f}" if f else "failed"
            for name, f in firsts.items()
        }
        print(
            f"{size:>3} | {tps['exo']:13.1f} | {tps['direct']:9.1f} | {tps['server']:6.1f} | {tps['uncached']:8.1f} | "
            f"{tps['exo'] / tps['direct']:6.3f} | {tps['exo'] / tps['server']:10.3f} | "
            f"{tps['exo'] / tps['uncached']:12.3f} | {first['exo']:>24} | {first['server']} | {first['uncached']}"
        )
    if 8 in sizes:
        at8 = {name: _median_tps(runs[name][8]) for name in runs}
        print(f"8 at once, exojet / batch_generate: {at8['exo'] / at8['direct']:.3f} (target >= 0.9)")
        print(f"8 at once, exojet / mlx_lm.server: {at8['exo'] / at8['server']:.3f} (target > 1)")
        print(f"8 at once, exojet / mlx_lm.server without its prompt cache: {at8['exo'] / at8['uncached']:.3f}")
