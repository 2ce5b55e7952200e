"""The MLX part of bench/structured_output.py: constrained against free decoding per token, and the
cost of reading tool calls per chat, in one run (run by it in a child process whose environment is
the engine child's: its BLAS preloaded, runner/mlx_cpu.py).

On the engine's own batch driver (runner/mlx_batch.py) in this process, on the default model's
weights as the engine runs them (dense float32 where it chooses that): B chats at once of the same
prompt decode `--tokens` tokens free, then each under LLGuidance's mask of a JSON schema whose
string cannot end sooner (runner/mlx_grammar.py; the driver stops at no end-of-sequence token, so
both decode the same count), `--repeat` times each, alternating; the time per decode step after
the first token. Then the mask alone per token (LLGuidance's bitmask and its expansion to the
logits' width, no model), and the tool calls of a two-call answer read per chat: in a model's own
syntax through mlx-lm's parser (runner/answer_stream.py, streamed 4 characters a delta) and on the
generic path (runner/generic_tools.read_answer).

    .venv/bin/python -m bench.structured_output_mlx [--tokens 64] [--repeat 3] [--chats 1,4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.structured_output import ASK, STORY
from exojet.bus.sampling import Sampling
from exojet.bus.tools import FunctionDef, Tool
from exojet.models.smollm import ensure_default_model
from exojet.runner import generic_tools
from exojet.runner.answer_plan import AnswerPlan, schema_grammar
from exojet.runner.answer_stream import AnswerStream, ToolSyntax
from exojet.runner.engine_protocol import Generate
from exojet.runner.mlx_batch import BatchDriver
from exojet.runner.mlx_capacity import Capacity
from exojet.runner.mlx_cpu import choose_weights, find_blas, to_dense_float32
from exojet.runner.mlx_grammar import GrammarCompiler

CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
    {"name": "get_time", "arguments": {"zone": "CET"}},
]


def load(models_dir: Path) -> tuple[Any, Any, str]:
    """The default model as the MLX engine runs it, its tokenizer, and how its weights run."""
    import psutil
    from mlx_lm.utils import load as mlx_load

    model, tokenizer = mlx_load(str(ensure_default_model(models_dir)))
    weights, _ = choose_weights(model, True, "auto", psutil.virtual_memory().available)
    if weights == "dense":
        to_dense_float32(model)
    return model, tokenizer, weights


def step_ms(driver: BatchDriver, prompt: list[int], tokens: int, chats: int, masks: list[Any]) -> float:
    """Milliseconds per decode step of `chats` chats at once, each `tokens` tokens long (with
    `masks[i]` as chat i's logits processor, or free when `masks` is empty)."""
    req = Generate(messages=ASK, sampling=Sampling(max_tokens=tokens))
    handles = [driver.submit(prompt, req, ((masks[i],),) if masks else ()) for i in range(chats)]
    first_at = None
    steps = 0
    for handle in handles:
        while (step := handle.next_step(60)) is not None:
            first_at = first_at or time.perf_counter()
            steps += 1
            if step.finish is not None:
                break
    assert steps == tokens * chats, steps
    return (time.perf_counter() - (first_at or 0)) / (tokens - 1) * 1000


def mask_us(compiler: GrammarCompiler, grammar: str, width: int, tokens: list[int]) -> float:
    """Microseconds per token of the mask alone, along `tokens` (an answer the grammar allows)."""
    mask = compiler.mask(grammar)
    started = time.perf_counter()
    last = None
    for token in tokens:
        mask.allowed(last, width)
        last = token
    return (time.perf_counter() - started) / len(tokens) * 1e6


def parse_us(runs: int = 2000) -> tuple[float, float]:
    """Microseconds per chat to read a two-call answer: in a model's own tool syntax through mlx-lm's
    parser (streamed in 4-character deltas), and on the generic path."""
    from mlx_lm.tool_parsers import json_tools

    syntax = ToolSyntax(json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)
    native = "".join(f"{syntax.start}\n{json.dumps(c)}\n{syntax.end}" for c in CALLS)
    generic = json.dumps({"tool_calls": CALLS})
    tools = tuple(
        Tool(type="function", function=FunctionDef(name=c["name"], parameters={"type": "object"})) for c in CALLS
    )
    plan = AnswerPlan(messages=tuple(ASK), template_tools=tools)
    started = time.perf_counter()
    for i in range(runs):
        answer = AnswerStream(plan, [], lambda _: None, f"call-{i}", syntax)
        for at in range(0, len(native), 4):
            answer.feed(native[at : at + 4])
        _, calls = answer.finish()
        assert len(calls) == 2
    native_us = (time.perf_counter() - started) / runs * 1e6
    started = time.perf_counter()
    for i in range(runs):
        generic_tools.read_answer(generic, f"call-{i}")
    return native_us, (time.perf_counter() - started) / runs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chats", default="1,4")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "exojet-bench-models")
    args = parser.parse_args()
    sizes = [int(c) for c in args.chats.split(",")]
    model, tokenizer, weights = load(args.models_dir)
    compiler = GrammarCompiler(tokenizer)
    grammar = schema_grammar(STORY)
    prompt = list(
        tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in ASK], add_generation_prompt=True)
    )
    # No end-of-sequence token stops a chat: free and constrained decode the same count.
    driver = BatchDriver(model, [], Capacity(max(sizes), "bench"))
    compiler.mask(grammar)  # LLGuidance's view of the tokenizer, built once
    step_ms(driver, prompt, 8, 1, [])  # warm-up
    free: dict[int, list[float]] = {n: [] for n in sizes}
    bound: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.repeat):
        for n in sizes:
            free[n].append(step_ms(driver, prompt, args.tokens, n, []))
            masks = [compiler.mask(grammar) for _ in range(n)]
            bound[n].append(step_ms(driver, prompt, args.tokens, n, masks))
    driver.close()
    answer = tokenizer.encode('{"title":"The Keeper","story":"' + "The light turned over the sea. " * 20)
    mask_cost = statistics.median(mask_us(compiler, grammar, model.args.vocab_size, answer) for _ in range(args.repeat))
    native_us, generic_us = parse_us()
    load_avg = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"MLX: default model ({weights} weights, {find_blas().library or 'MLX BLAS'}), {args.tokens} tokens a chat, "
        f"median of {args.repeat}; load average {load_avg}"
    )
    for n in sizes:
        f, b = statistics.median(free[n]), statistics.median(bound[n])
        print(
            f"{n} chat(s) at once: free {f:8.2f} ms/step, constrained {b:8.2f} ms/step ({b - f:+.2f} ms, x{b / f:.2f})"
        )
    print(f"the mask alone: {mask_cost:.1f} us/token ({tokenizer.vocab_size} tokens)")
    print(
        f"tool calls read per chat (two calls): in the model's syntax (mlx-lm's parser) {native_us:.1f} us, "
        f"generic {generic_us:.1f} us"
    )


if __name__ == "__main__":
    main()
