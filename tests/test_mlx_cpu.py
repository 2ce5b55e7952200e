"""MLX's CPU fast path: the BLAS the engine child gets, and dense float32 weights.

The engine tests are real: the child is `python -m exojet.runner.engine_child`, its
memory map shows what it loaded, and the default model (SmolLM2, 4-bit) runs both ways.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from exojet.bus.sampling import Sampling
from exojet.runner.engine import Engine
from exojet.runner.engine_protocol import Done, Generate, Message
from exojet.runner.mlx_cpu import (
    BLAS_ENV,
    DENSE_MAX_FREE_FRACTION,
    Blas,
    child_env,
    choose_weights,
    dense_float32_bytes,
    find_blas,
    to_dense_float32,
)
from testbed.tiny_model import write_tiny_llama

GIB = 1 << 30


def test_the_blas_follows_the_environment(tmp_path: Path) -> None:
    library = tmp_path / "libsomeblas.so"
    library.write_bytes(b"")

    assert find_blas({BLAS_ENV: str(library)}) == Blas(str(library), f"${BLAS_ENV}")
    assert find_blas({BLAS_ENV: "none"}).library is None
    missing = find_blas({BLAS_ENV: str(tmp_path / "nowhere.so")})
    assert missing.library is None
    assert "is not a file" in missing.reason
    assert find_blas({}, platform="darwin") == Blas(None, "MLX's own BLAS (not Linux)")

    env = child_env(Blas(str(library), "test"), {"LD_PRELOAD": "/other.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": f"{library}:/other.so", "PATH": "/bin"}
    assert child_env(Blas(None, "test"), {"PATH": "/bin"}) == {"PATH": "/bin"}


async def _mapped(engine: Engine) -> str:
    """The child's memory map once it serves (the loader maps libraries after exec returns)."""
    await engine.unload()
    return Path(f"/proc/{engine.pid}/maps").read_text()


@pytest.mark.timeout(60)
async def test_the_engine_child_gets_the_blas_through_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine()
    await engine.start()
    try:
        if engine.blas.library is not None:
            assert os.path.realpath(engine.blas.library) in await _mapped(engine)
            assert engine.blas.library in engine.setup
        else:
            # run-tests.sh installs it where it can (as root on Debian).
            assert "libopenblas0-pthread is not installed" in engine.blas.reason
            assert "libopenblas" not in await _mapped(engine)
    finally:
        await engine.stop()

    monkeypatch.setenv(BLAS_ENV, "none")
    without = Engine()
    await without.start()
    try:
        assert "libopenblas" not in await _mapped(without)
        assert without.setup.startswith("BLAS: MLX's own")
    finally:
        await without.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _quantized(path: Path) -> Any:
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    nn.quantize(model, group_size=32, bits=4)
    return model


def test_dense_weights_only_when_quantized_whole_and_fitting(tiny_model: Path) -> None:
    from mlx_lm.utils import load_model

    dense_model, _ = load_model(tiny_model)
    assert choose_weights(dense_model, True, "auto", 64 * GIB) == ("stored", "the model is not quantized")

    model = _quantized(tiny_model)
    need = dense_float32_bytes(model)
    fits = int(need / DENSE_MAX_FREE_FRACTION) + 1
    assert choose_weights(model, True, "auto", fits)[0] == "dense"
    weights, reason = choose_weights(model, True, "auto", fits - 2)
    assert weights == "stored"
    assert "of the free memory" in reason
    assert choose_weights(model, False, "auto", 64 * GIB) == (
        "stored",
        "a layer range: only its own layers are in memory",
    )
    assert choose_weights(model, False, "dense", 0) == ("dense", "asked for")


def test_dense_float32_bytes_is_what_dequantizing_gives(tiny_model: Path) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    original, _ = load_model(tiny_model)
    elements = sum(a.size for _, a in tree_flatten(original.parameters()))
    model = _quantized(tiny_model)
    predicted = dense_float32_bytes(model)

    assert to_dense_float32(model) == predicted == 4 * elements
    assert not any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())
    assert {a.dtype for _, a in tree_flatten(model.parameters())} == {mx.float32}


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exojet.models.smollm import SmolLMNotInstalled, ensure_default_model

    try:
        return ensure_default_model(tmp_path_factory.mktemp("models"))
    except SmolLMNotInstalled as error:
        pytest.skip(f"needs the default model: {error}")


async def _greedy(engine: Engine) -> str:
    request = Generate(
        messages=[Message("user", "Write a short story about a lighthouse keeper.")], sampling=Sampling(max_tokens=48)
    )
    async for reply in engine.generate(request):
        if isinstance(reply, Done):
            assert reply.completion_tokens == 48
            return reply.text
    raise AssertionError("generation ended without Done")


@pytest.mark.timeout(180)
async def test_the_default_model_runs_dense_with_the_same_tokens(default_model: Path) -> None:
    engine = Engine("mlx")
    await engine.start()
    try:
        stored = await engine.load(str(default_model), weights="stored")
        stored_text = await _greedy(engine)
        auto = await engine.load(str(default_model))
        auto_text = await _greedy(engine)
    finally:
        await engine.stop()

    # 135M parameters: about 540 MB dense, far under half the memory of any machine this runs on.
    assert (auto.weights, stored.weights) == ("dense", "stored")
    assert "MB dense float32" in auto.weights_reason
    assert auto.weight_bytes > 4 * stored.weight_bytes
    assert auto_text == stored_text
