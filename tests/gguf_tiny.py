"""Write a tiny llama as a GGUF file the way llama.cpp's converter does.

The source is a `write_tiny_llama` folder (Hugging Face layout). Q/K rows are
permuted into llama.cpp's interleaved rope layout, tensors are quantized with the
`gguf` package's reference quantizers, and the tokenizer is stored as GGUF
tokens, types and merges. The caller gets back the weights the GGUF really holds
(dequantized, in Hugging Face layout), so a model built from them is the ground
truth for what an import must reproduce.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import dequantize, quantize

Q = gguf.GGMLQuantizationType

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute`: half-split rope rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    """`model.layers.2.mlp.up_proj.weight` -> `blk.2.ffn_up.weight`."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def write_tiny_gguf(
    source: Path,
    gguf_path: Path,
    tensor_type: Callable[[str], gguf.GGMLQuantizationType],
    pre: str = "smollm",
    tie_embeddings: bool = False,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Write `source` as a GGUF; return (HF config, weights as stored, HF layout)."""
    config = json.loads((source / "config.json").read_text())
    config["tie_word_embeddings"] = tie_embeddings
    weights = {k: np.array(v) for k, v in mx.load(str(source / "model.safetensors")).items()}
    if tie_embeddings:
        del weights["lm_head.weight"]
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    chat_template = json.loads((source / "tokenizer_config.json").read_text())["chat_template"]

    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]

    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)

    stored: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if ".self_attn.q_proj." in name:
            w = llama_cpp_permute(w, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            w = llama_cpp_permute(w, config["num_key_value_heads"])
        qtype = tensor_type(name) if w.ndim == 2 else Q.F32
        data = quantize(w, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        held = dequantize(data, qtype).reshape(w.shape).astype(np.float32)
        # Undo the permutation so that `stored` is a plain Hugging Face checkpoint.
        if ".self_attn.q_proj." in name:
            held = llama_cpp_unpermute(held, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            held = llama_cpp_unpermute(held, config["num_key_value_heads"])
        stored[name] = held
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, stored


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llama_cpp_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_gguf(folder: Path, dest: Path, qtype: Q = Q.F32) -> Path:
    """`folder`'s llama as a GGUF, its matrices in `qtype` (norms stay F32, as llama.cpp's converter keeps them)."""
    write_tiny_gguf(folder, dest, lambda name: Q.F32 if "norm" in name else qtype)
    return dest
