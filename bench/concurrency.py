"""Concurrency benchmark: B chats at once through the HTTP API, against the engine's own server.

One stack in one run (nats-server, a supervisor, a runner serving the model on llama.cpp,
`exojet api`) and, in this process, xllamacpp's server engine on the same GGUF with the same
parameters (threads, 16 slots, one unified KV cache: `server_params`). For each B in 1, 2, 4,
8, 16, 32, alternated so machine drift hits both alike:
  - exojet: B streamed chats at once through the official `openai` client (distinct prompts,
    greedy, `--tokens` each): aggregate tokens/s (every completion token over the wall time)
    and each chat's first token (from its call to its first text), p50 and p99;
  - direct: the same B requests at once on the in-process server engine (a thread each, as the
    runner's engine child runs them);
  - llama.cpp's own HTTP server on the same GGUF and parameters, in a process of its own
    (bench/llamacpp_server.py), through the same client: the server users would run instead.
Then (a) the same 8 chats one at a time through exojet, and a ninth chat sent while 8 are
generating: its first token, and the time from its task stored in the log to its first chunk
stored (server timestamps). Prints medians of `--repeat` runs and the ratios.
MLX (`--engines mlx`, at `--mlx-sizes`): against mlx-lm's `batch_generate` and `mlx_lm.server`
on the same weights and BLAS (bench/concurrency_mlx.py).

    .venv/bin/python bench/concurrency.py [--tokens 96] [--repeat 3] [--sizes 1,2,4,8,16,32]
        [--engines llamacpp,mlx] [--mlx-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import openai
from loguru import logger

from bench.api_stack import serving
from bench.inference import with_engine_env
from exojet.bus import subjects
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.ops.server import free_port
from exojet.bus.sampling import Sampling
from exojet.bus.streams import CHUNKS_STREAM
from exojet.bus.tasks import ChatCompletion
from exojet.models.smollm import DEFAULT_MODEL_ID
from exojet.projections.words import message_of
from exojet.runner.engine_choice import choose_engine, installed_engines
from exojet.runner.engine_llamacpp import MAX_CONTEXT, chat_body, gguf_facts, server_params
from exojet.runner.engine_protocol import Generate, Message
from testbed.api_process import until_healthy

PROMPT = "Write a short story about a lighthouse keeper, number {}."


class Batch(msgspec.Struct):
    """B chats at once: every completion token over the wall time, and each one's first token."""

    tokens: int
    wall: float
    first_tokens: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Streamed(msgspec.Struct, frozen=True):
    """One streamed chat: its first text (from the call) and its usage."""

    first: float
    prompt_tokens: int
    completion_tokens: int


async def streamed_chat(
    api: openai.AsyncOpenAI, model_id: str, messages: list[dict[str, str]], max_tokens: int
) -> Streamed:
    """A greedy chat streamed through the official client, timed to its first text."""
    started = time.perf_counter()
    first = 0.0
    usage = (0, 0)
    async for chunk in await api.chat.completions.create(
        model=model_id,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if not first and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return Streamed(first, *usage)


async def api_batch(api: openai.AsyncOpenAI, model_id: str, size: int, max_tokens: int, offset: int = 0) -> Batch:
    """`size` streamed chats at once through the HTTP API."""

    async def one(i: int) -> tuple[int, float]:
        messages = [{"role": "user", "content": PROMPT.format(offset + i)}]
        chat = await streamed_chat(api, model_id, messages, max_tokens)
        return chat.completion_tokens, chat.first

    started = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(size)))
    return Batch(sum(t for t, _ in done), time.perf_counter() - started, [f for _, f in done])


class Direct:
    """xllamacpp's server engine in this process, with the runner's parameters and request body."""

    def __init__(self, gguf: Path) -> None:
        import xllamacpp

        context = min(MAX_CONTEXT, gguf_facts(gguf).context_length or MAX_CONTEXT)
        self.socket_dir = tempfile.TemporaryDirectory(prefix="bench-concurrency-")
        self.server = xllamacpp.Server(server_params(gguf, context, Path(self.socket_dir.name) / "direct.sock"))

    def batch(self, size: int, max_tokens: int) -> Batch:
        """`size` requests at once, a thread each (the server engine batches their tokens)."""
        results: list[tuple[int, float]] = [(0, 0.0)] * size

        def one(i: int) -> None:
            started = time.perf_counter()
            state = {"first": 0.0, "tokens": 0}

            def on_chunk(chunk: dict) -> bool:
                if not state["first"] and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    state["first"] = time.perf_counter() - started
                if chunk.get("usage"):
                    state["tokens"] = chunk["usage"]["completion_tokens"]
                return False

            body = chat_body(
                Generate(messages=[Message("user", PROMPT.format(i))], sampling=Sampling(max_tokens=max_tokens))
            )
            self.server.handle_chat_completions(body, on_chunk)
            results[i] = (int(state["tokens"]), state["first"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return Batch(sum(t for t, _ in results), time.perf_counter() - started, [f for _, f in results])


async def one_at_a_time(api: openai.AsyncOpenAI, model_id: str, count: int, max_tokens: int) -> Batch:
    """(a): the same chats through exojet, each after the last."""
    started = time.perf_counter()
    parts = [await api_batch(api, model_id, 1, max_tokens, offset=i) for i in range(count)]
    return Batch(sum(p.tokens for p in parts), time.perf_counter() - started, [p.first_tokens[0] for p in parts])


async def late_chat(api: openai.AsyncOpenAI, model_id: str, busy: int, max_tokens: int) -> tuple[float, str]:
    """A chat sent once `busy` others stream: its first token, and its id."""
    firsts = [asyncio.Event() for _ in range(busy)]

    async def background(i: int) -> None:
        async for chunk in await api.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": PROMPT.format(100 + i)}],
            max_tokens=max_tokens * 4,
            temperature=0,
            stream=True,
        ):
            if any(c.delta.content for c in chunk.choices):
                firsts[i].set()

    others = [asyncio.ensure_future(background(i)) for i in range(busy)]
    await asyncio.gather(*(f.wait() for f in firsts))
    started = time.perf_counter()
    first, chat_id = 0.0, ""
    async for chunk in await api.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT.format(999)}], max_tokens=8, stream=True
    ):
        chat_id = chunk.id
        if not first and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - started
    await asyncio.gather(*others)
    return first, chat_id


async def task_to_first_chunk(nats_url: str, chat_ids: list[str]) -> list[float]:
    """Per chat: from its task stored in EXO_LOG to its first chunk stored in EXO_CHUNKS."""
    stored: dict[str, float] = {}
    first: dict[str, float] = {}

    def on_log(env: Envelope) -> None:
        message = message_of(env)
        if isinstance(message, ChatCompletion) and message.stream_id in chat_ids:
            stored[message.stream_id] = env.time

    def on_chunk(env: Envelope) -> None:
        stream_id = subjects.chunks_stream_id(env.subject)
        if stream_id in chat_ids and stream_id not in first:
            first[stream_id] = env.time

    nc = await client.connect(nats_url, name="bench-concurrency")
    try:
        await client.replay(nc, on_log)
        await client.replay(nc, on_chunk, stream=CHUNKS_STREAM)
    finally:
        await nc.close()
    return [first[c] - stored[c] for c in chat_ids if c in stored and c in first]


@contextmanager
def llamacpp_server(gguf: Path) -> Iterator[str]:
    """llama.cpp's own HTTP server on `gguf` in a process of its own (bench/llamacpp_server.py):
    its OpenAI base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "llamacpp_server.py"), str(gguf), str(port)])
    try:
        until_healthy(f"http://127.0.0.1:{port}", proc, timeout=120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def main(model_id: str, max_tokens: int, repeat: int, sizes: list[int]) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with serving(model_id, "llamacpp") as served:
        _, gguf = choose_engine(served.model_path, "llamacpp", installed_engines())
        direct = Direct(gguf)
        base_url = f"http://127.0.0.1:{served.port}/v1"
        with llamacpp_server(gguf) as peer_url:
            results = asyncio.run(_measure(base_url, peer_url, model_id, direct, max_tokens, repeat, sizes))
        hop = asyncio.run(task_to_first_chunk(served.nats_url, results["late_ids"]))
    _report(model_id, max_tokens, repeat, sizes, results, hop)


async def _measure(
    base_url: str, peer_url: str, model_id: str, direct: Direct, max_tokens: int, repeat: int, sizes: list[int]
) -> dict:
    api = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    peer = openai.AsyncOpenAI(base_url=peer_url, api_key="bench", max_retries=0, timeout=600)
    await api_batch(api, model_id, 2, 8)  # warm all three up
    await api_batch(peer, model_id, 2, 8)
    direct.batch(2, 8)
    exo: dict[int, list[Batch]] = {b: [] for b in sizes}
    own: dict[int, list[Batch]] = {b: [] for b in sizes}
    server: dict[int, list[Batch]] = {b: [] for b in sizes}
    serial: list[Batch] = []
    late: list[float] = []
    late_ids: list[str] = []
    for _ in range(repeat):
        for size in sizes:
            exo[size].append(await api_batch(api, model_id, size, max_tokens))
            own[size].append(await asyncio.to_thread(direct.batch, size, max_tokens))
            server[size].append(await api_batch(peer, model_id, size, max_tokens))
        serial.append(await one_at_a_time(api, model_id, 8, max_tokens))
        first, chat_id = await late_chat(api, model_id, 8, max_tokens)
        late.append(first)
        late_ids.append(chat_id)
    await api.close()
    await peer.close()
    return {"exo": exo, "own": own, "server": server, "serial": serial, "late": late, "late_ids": late_ids}


def _report(model_id: str, max_tokens: int, repeat: int, sizes: list[int], r: dict, hop: list[float]) -> None:
    print(
        f"model {model_id} on llama.cpp, {max_tokens} tokens a chat, greedy, median of {repeat}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'B':>3} | {'exojet tok/s':>12} | {'direct tok/s':>12} | ratio | {'llama.cpp server':>16} | ratio | "
        "exojet first p50/p99 ms | direct p50/p99 ms | server p50/p99 ms"
    )
    for size in sizes:
        exo, own, server = r["exo"][size], r["own"][size], r["server"][size]
        e_tps, d_tps, s_tps = (statistics.median(b.tokens_per_second for b in runs) for runs in (exo, own, server))
        firsts = [
            f"{_pct(fs, 0.5) * 1000:6.0f} / {_pct(fs, 0.99) * 1000:6.0f}"
            for fs in ([f for b in runs for f in b.first_tokens] for runs in (exo, own, server))
        ]
        print(
            f"{size:>3} | {e_tps:12.1f} | {d_tps:12.1f} | {e_tps / d_tps:5.3f} | {s_tps:16.1f} | "
            f"{e_tps / s_tps:5.3f} | " + " | ".join(firsts)
        )
    serial = statistics.median(b.tokens_per_second for b in r["serial"])
    if 8 in sizes:
        at8 = statistics.median(b.tokens_per_second for b in r["exo"][8])
        own8 = statistics.median(b.tokens_per_second for b in r["own"][8])
        server8 = statistics.median(b.tokens_per_second for b in r["server"][8])
        print(f"8 at once through exojet / direct: {at8 / own8:.3f} (target >= 0.9)")
        print(f"8 at once through exojet / llama.cpp's own server: {at8 / server8:.3f} (target >= 0.9)")
        print(f"8 at once / the same 8 one at a time through exojet ({serial:.1f} tok/s): {at8 / serial:.2f}x")
    print(f"a chat sent while 8 generate: first token {statistics.median(r['late']) * 1000:.0f} ms (target < 1000)")
    if hop:
        print(f"  its task stored -> first chunk stored: {statistics.median(hop) * 1000:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,8,16,32")
    parser.add_argument("--engines", default="llamacpp,mlx", help="comma-separated: llamacpp, mlx")
    parser.add_argument("--mlx-sizes", default="1,8,32")
    args = parser.parse_args()
    with_engine_env()
    engines = args.engines.split(",")
    if "llamacpp" in engines:
        main(args.model, args.tokens, args.repeat, [int(s) for s in args.sizes.split(",")])
    if "mlx" in engines:
        from bench import concurrency_mlx

        concurrency_mlx.main(args.model, args.tokens, args.repeat, [int(s) for s in args.mlx_sizes.split(",")])
