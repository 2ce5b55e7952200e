"""Constrained against free decoding per token on each engine, and the cost of reading tool calls
per chat, in one run (issue 30, item 6).

On the engine's own library in this process (xllamacpp's server engine with the runner's
parameters) and the default model: the same prompt decoded `--tokens` tokens free, then under the
LLGuidance grammar of a JSON schema whose string cannot end sooner (both with `ignore_eos`, so
both decode the same count), `--repeat` times each; llama.cpp's own decode time per token from its
timings. Then runner/generic_tools.read_answer on a two-call answer, per chat. Then MLX
(bench/structured_output_mlx.py, in a child process with the engine child's environment: its BLAS
preloaded): free and constrained decode steps of 1 and 4 chats at once through the engine's batch
driver, the mask alone per token, and the tool calls read in a model's own syntax.

    .venv/bin/python bench/structured_output.py [--tokens 128] [--repeat 3] [--engines llamacpp,mlx]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exojet.bus.sampling import Sampling
from exojet.models.smollm import GGUF_NAME, ensure_default_model
from exojet.runner import generic_tools
from exojet.runner.answer_plan import schema_grammar
from exojet.runner.engine_llamacpp import MAX_CONTEXT, chat_body, server_params
from exojet.runner.engine_protocol import Generate, Message
from exojet.runner.mlx_cpu import child_env, find_blas

STORY = {
    "type": "object",
    # Longer than any answer measured: the grammar never lets the answer end before `--tokens`.
    "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string", "minLength": 20_000}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
ASK = [Message(role="user", content="Write a long story about a lighthouse keeper, as JSON.")]
ANSWER = json.dumps(
    {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
            {"name": "get_time", "arguments": {"zone": "CET"}},
        ]
    }
)


def per_token_ms(server: Any, tokens: int, grammar: str | None) -> float:
    """llama.cpp's decode time per token of one answer of exactly `tokens` tokens."""
    body = chat_body(Generate(messages=ASK, sampling=Sampling(max_tokens=tokens, seed=1)))
    body |= {"ignore_eos": True} | ({"grammar": grammar} if grammar else {})
    chunks: list[dict[str, Any]] = []
    server.handle_chat_completions(json.dumps(body), lambda raw: chunks.append(json.loads(raw)) and False)
    [last] = [c for c in chunks if c.get("timings")]
    assert last["usage"]["completion_tokens"] == tokens, last["usage"]
    return float(last["timings"]["predicted_per_token_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "exojet-bench-models")
    parser.add_argument("--engines", default="llamacpp,mlx", help="comma-separated: llamacpp, mlx")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if "llamacpp" in engines:
        llamacpp(args)
    if "mlx" in engines:
        mlx_args = ["--tokens", str(args.tokens), "--repeat", str(args.repeat), "--models-dir", str(args.models_dir)]
        subprocess.run(
            [sys.executable, "-m", "bench.structured_output_mlx", *mlx_args],
            env=child_env(find_blas()),
            cwd=Path(__file__).resolve().parent.parent,
            check=True,
        )


def llamacpp(args: argparse.Namespace) -> None:
    """The llama.cpp part: free and constrained decoding per token, the generic answer's parsing."""
    import xllamacpp

    model = ensure_default_model(args.models_dir) / GGUF_NAME
    with tempfile.TemporaryDirectory() as sockets:
        server = xllamacpp.Server(server_params(model, MAX_CONTEXT, Path(sockets) / "bench.sock"))
        grammar = schema_grammar(STORY)
        per_token_ms(server, 8, None)  # warm-up
        free = [per_token_ms(server, args.tokens, None) for _ in range(args.repeat)]
        constrained = [per_token_ms(server, args.tokens, grammar) for _ in range(args.repeat)]
    started = time.perf_counter()
    runs = 10_000
    for i in range(runs):
        generic_tools.read_answer(ANSWER, f"call-{i}")
    parse_us = (time.perf_counter() - started) / runs * 1e6
    free_ms, constrained_ms = statistics.median(free), statistics.median(constrained)
    print(f"{model.name}, {args.tokens} tokens, median of {args.repeat}")
    print(f"free decoding         {free_ms:8.2f} ms/token")
    extra = f"{constrained_ms - free_ms:+.2f} ms, x{constrained_ms / free_ms:.2f}"
    print(f"constrained (schema)  {constrained_ms:8.2f} ms/token  ({extra})")
    print(f"generic tool answer parsed in {parse_us:.1f} us per chat (two calls)")


if __name__ == "__main__":
    main()
