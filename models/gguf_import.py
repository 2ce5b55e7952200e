"""Turn a llama-architecture GGUF file into an mlx-lm model folder.

`mx.load` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine
quantized triples (packed uint32 weight, float16 scales and biases, group size 32)
that dequantize exactly to what llama.cpp computes; other types arrive dense. We
keep the packed weights bit for bit, widen scales/biases/norms/embeddings to the
requested dtype (float32 by default: half-precision matmul is slow on CPU), rename
tensors to mlx-lm's llama names and rebuild the Hugging Face tokenizer files from
the GGUF vocabulary.

Rope: llama.cpp's converter permutes the Q/K rows of every head from Hugging Face's
half-split rope layout into interleaved pairs. MLX's `traditional` rope rotates
exactly those interleaved pairs, so we keep the rows as they are and set
`rope_traditional: true`; no quantized row has to move.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from loguru import logger
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from exojet.bus.model_ids import model_id_problem
from exojet.models.store import is_complete, model_dir

GROUP_SIZE = 32
READABLE_TYPES = "F32, F16, BF16, Q4_0, Q4_1, Q8_0"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp's pre-tokenizer names mapped to the Hugging Face pre-tokenizers that
# split text the same way. ByteLevel(use_regex=True) applies the GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFImportError(ValueError):
    """The GGUF file holds something this importer does not convert faithfully."""


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer isolates every digit before the GPT-2 split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise GGUFImportError(f"GGUF pre-tokenizer {pre!r} is not supported (known: default, gpt-2, smollm, llama-bpe)")


def _meta_number(meta: dict[str, Any], key: str, default: float | None = None) -> float:
    """A numeric metadata value (mx.load gives 0-d arrays), else `default`, else an error."""
    if key in meta:
        number: float = meta[key].item()
        return number
    if default is None:
        raise GGUFImportError(f"GGUF metadata lacks {key!r}")
    return default


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    return int(_meta_number(meta, key, default))


def _token(tokens: list[str], meta: dict[str, Any], key: str) -> str | None:
    return tokens[_meta_int(meta, key)] if key in meta else None


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's byte-level BPE vocabulary.

    `meta` is the metadata dict of `mx.load(path, return_metadata=True)`.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            # Llama 3's tokenizer looks whole words up in the vocabulary first.
            ignore_merges=pre == "llama-bpe",
        )
    )
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()

    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else []
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _TOKEN_CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _TOKEN_USER_DEFINED
        ]
    )

    add_bos = "tokenizer.ggml.add_bos_token" in meta and bool(meta["tokenizer.ggml.add_bos_token"].item())
    bos = _token(tokens, meta, "tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        bos_id = _meta_int(meta, "tokenizer.ggml.bos_token_id")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    return tok


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(tokens, meta, "tokenizer.ggml.bos_token_id"),
        "eos_token": _token(tokens, meta, "tokenizer.ggml.eos_token_id"),
        "unk_token": _token(tokens, meta, "tokenizer.ggml.unknown_token_id"),
        "pad_token": _token(tokens, meta, "tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    if "llama.context_length" in meta:
        config["model_max_length"] = _meta_int(meta, "llama.context_length")
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _mlx_module(gguf_base: str) -> str:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`."""
    if gguf_base in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_base]
    parts = gguf_base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFImportError(f"GGUF tensor {gguf_base!r} has no llama counterpart in mlx-lm")


def _convert_weights(
    raw: dict[str, mx.array], dtype: mx.Dtype, dequantize: bool
) -> tuple[dict[str, mx.array], dict[str, int | None]]:
    """mlx-lm weights, and the bits of every matrix module (None: stored dense)."""
    weights: dict[str, mx.array] = {}
    module_bits: dict[str, int | None] = {}
    for name, array in raw.items():
        base, _, suffix = name.rpartition(".")
        if suffix in ("scales", "biases"):
            continue
        module = _mlx_module(base)
        if f"{base}.scales" not in raw:
            weights[f"{module}.{suffix}"] = array.astype(dtype)
            if array.ndim == 2:
                module_bits[module] = None
            continue
        # float32 scales/biases reproduce llama.cpp's dequantized values exactly;
        # float16 arithmetic would round them.
        scales = raw[f"{base}.scales"].astype(mx.float32)
        biases = raw[f"{base}.biases"].astype(mx.float32)
        bits = array.shape[-1] // scales.shape[-1]
        if dequantize:
            dense = mx.dequantize(array, scales, biases, group_size=GROUP_SIZE, bits=bits)
            weights[f"{module}.weight"] = dense.astype(dtype)
            module_bits[module] = None
        else:
            weights[f"{module}.weight"] = array
            weights[f"{module}.scales"] = scales.astype(dtype)
            weights[f"{module}.biases"] = biases.astype(dtype)
            module_bits[module] = bits
    return weights, module_bits


def _quantization(module_bits: dict[str, int | None]) -> dict[str, Any] | None:
    """mlx-lm's `quantization` entry: the common bits plus per-module exceptions."""
    counts = Counter(b for b in module_bits.values() if b is not None)
    if not counts:
        return None
    # Most common bits first; on a tie the smaller, for a stable answer.
    default = min(counts, key=lambda b: (-counts[b], b))
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    for module, bits in sorted(module_bits.items()):
        if bits is None:
            quantization[module] = False
        elif bits != default:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return quantization


def _llama_config(
    meta: dict[str, Any],
    weights: dict[str, mx.array],
    quantization: dict[str, Any] | None,
    dtype: str,
) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise GGUFImportError(f"GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    hidden = _meta_int(meta, "llama.embedding_length")
    heads = _meta_int(meta, "llama.attention.head_count")
    head_dim = _meta_int(meta, "llama.attention.key_length", hidden // heads)
    rope_dims = _meta_int(meta, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFImportError(f"partial rope ({rope_dims} of {head_dim} head dims) is not supported")
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, "llama.block_count"),
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _meta_number(meta, "llama.attention.layer_norm_rms_epsilon"),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "rope_theta": _meta_number(meta, "llama.rope.freq_base", 10000.0),
        "rope_traditional": True,
        "max_position_embeddings": _meta_int(meta, "llama.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "torch_dtype": dtype,
    }
    for key, name in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ):
        if name in meta:
            config[key] = _meta_int(meta, name)
    if quantization is not None:
        config["quantization"] = quantization
    return config


def _hidden_sibling(final: Path, purpose: str) -> Path:
    """A fresh dot-folder next to `final`: hidden from listings, same filesystem."""
    path = final.parent / f".{final.name}.{purpose}-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def _publish(staging: Path, final: Path) -> None:
    """Move the finished staging folder to `final`, replacing an older import."""
    if final.exists():
        retired = _hidden_sibling(final, "replaced")
        final.rename(retired / final.name)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
        return
    staging.rename(final)


def import_gguf(
    gguf_path: Path,
    model_id: str,
    models_dir: Path,
    dtype: str = "float32",
    dequantize: bool = False,
) -> Path:
    """Import a llama GGUF file as the mlx-lm model `model_id`; return its folder.

    Q4_0/Q4_1/Q8_0 tensors stay quantized (group size 32) unless `dequantize`;
    scales, biases and every dense tensor are written as `dtype`. The folder is
    built next to its destination and renamed into place, so a failed or
    interrupted import never leaves a folder that looks complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    final = model_dir(models_dir, model_id)
    started = time.perf_counter()
    logger.info("importing GGUF {} as {} ({}, dequantize={})", gguf_path, model_id, dtype, dequantize)

    try:
        loaded = mx.load(str(gguf_path), return_metadata=True)
    except RuntimeError as error:
        # MLX only names the failing step, e.g. "gguf_tensor_to_f16 failed".
        raise GGUFImportError(
            f"MLX cannot read {gguf_path} ({error}); readable tensor types are {READABLE_TYPES}"
        ) from error
    # With return_metadata, a GGUF load is (tensors, metadata); the stubs say less.
    raw, meta = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    weights, module_bits = _convert_weights(raw, DTYPES[dtype], dequantize)
    del raw
    quantization = _quantization(module_bits)
    config = _llama_config(meta, weights, quantization, dtype)
    tokenizer = gguf_tokenizer(meta)
    logger.info(
        "converted {} tensors ({} layers, quantization={}) in {:.2f}s",
        len(weights),
        config["num_hidden_layers"],
        {k: v for k, v in (quantization or {}).items() if k in ("group_size", "bits")} or None,
        time.perf_counter() - started,
    )

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(final, "importing")
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=2))
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in final.iterdir())
    logger.info(
        "imported {} into {} ({:.1f} MB) in {:.2f}s",
        model_id,
        final,
        size / 1e6,
        time.perf_counter() - started,
    )
    return final


def list_models(models_dir: Path) -> list[tuple[str, int]]:
    """Complete model folders in `models_dir` as (model id, size in bytes), by id."""
    if not models_dir.is_dir():
        return []
    found = []
    for folder in sorted(models_dir.iterdir()):
        model_id = folder.name.replace("--", "/", 1)
        if folder.name.startswith(".") or not folder.is_dir() or model_id_problem(model_id):
            continue
        if is_complete(folder):
            found.append((model_id, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())))
    return found
