"""A tiny llama with random weights and a BPE tokenizer, built on the spot.

Tests need a real mlx-lm model folder that loads in milliseconds and generates
deterministically; nothing here touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "hello world, hi there! how are you today? I am fine, thank you.",
    "user assistant system: tell me a story about a small llama on a hill.",
    "0123456789 one two three four five six seven eight nine ten",
    "exojet runs runners and a supervisor over NATS JetStream.",
]


def tiny_llama_config(n_layers: int = 4, vocab_size: int = 320, hidden_size: int = 64) -> dict[str, Any]:
    """The config.json of the tiny llama (float32, small enough for any CPU)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": n_layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        # Room for the endless generations tests make (plain RoPE never reads it);
        # tests that need a real window copy the model with a smaller one (`with_context`).
        "max_position_embeddings": 1 << 20,
        "torch_dtype": "float32",
        "eos_token_id": 2,
        "bos_token_id": 0,
    }


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def write_tiny_llama(path: Path, n_layers: int = 4, seed: int = 0, hidden_size: int = 64) -> Path:
    """Write a complete mlx-lm model folder (config, safetensors, tokenizer) to `path`
    (a wider `hidden_size` gives weights big enough to measure in memory)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size=320)
    config = tiny_llama_config(n_layers=n_layers, vocab_size=tok.get_vocab_size(), hidden_size=hidden_size)
    config["eos_token_id"] = tok.token_to_id("<|im_end|>")
    config["bos_token_id"] = tok.token_to_id("<|endoftext|>")

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Random init gives near-uniform logits; scaling the embeddings makes greedy
    # decoding pick distinct tokens instead of ties that could flip between runs.
    weights = dict(tree_flatten(model.parameters()))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 4.0
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})

    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return path


def with_context(model: Path, path: Path, context: int) -> Path:
    """A copy of the model at `model` whose context window is `context` tokens."""
    shutil.copytree(model, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = context
    (path / "config.json").write_text(json.dumps(config))
    return path
