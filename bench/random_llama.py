"""A random llama big enough that generation takes measurable time (bench only).

The tokenizer, chat template and folder layout are the tests' tiny llama; only the
sizes grow, so a benchmark needs no download and no real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from testbed.tiny_model import write_tiny_llama

BENCH_MODEL_ID = "local/bench-llama"


def write_random_llama(path: Path, hidden_size: int = 512, n_layers: int = 8, seed: int = 0) -> Path:
    """Write an mlx-lm model folder: a llama of `hidden_size` x `n_layers`, random float32 weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    write_tiny_llama(path, n_layers=n_layers, seed=seed)
    config = json.loads((path / "config.json").read_text())
    config.update(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_attention_heads=8, num_key_value_heads=4
    )
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # As in the tiny llama: sharper logits, so greedy decoding has no ties to flip.
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 4.0
    # Random weights end a generation early, or repeat a lone UTF-8 byte that
    # decodes to nothing, about as often as not. A zero row gives a token logit 0,
    # below the best of the others: only printable tokens stay, so every run
    # streams text and generates exactly max_tokens.
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    keep = mx.array([[1.0 if _printable(tokenizer.decode([i])) else 0.0] for i in range(config["vocab_size"])])
    weights["lm_head.weight"] = weights["lm_head.weight"] * keep
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _printable(text: str) -> bool:
    return text.isascii() and text.strip() != "" and text.isprintable()
