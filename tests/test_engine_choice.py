"""Which engine a model loads on (runner/engine_choice.py): per model, narrowed by
`--engine`, the fastest installed first; pipeline shards only where a ring exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from exojet.runner.engine_choice import NoEngineForModel, choose_engine


@pytest.fixture
def both(tmp_path: Path) -> Path:
    """A folder with MLX weights and a GGUF, as the default model's folder is."""
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.gguf").write_bytes(b"GGUF")
    return folder


def test_auto_takes_the_first_installed_engine_that_runs_the_model(both: Path, tmp_path: Path) -> None:
    mlx_only = tmp_path / "mlx"
    mlx_only.mkdir()
    (mlx_only / "config.json").write_text("{}")

    assert choose_engine(both, "auto", ["llamacpp", "mlx"]) == ("llamacpp", both / "model.gguf")
    assert choose_engine(both, "auto", ["mlx", "llamacpp"]) == ("mlx", both)
    assert choose_engine(mlx_only, "auto", ["llamacpp", "mlx"]) == ("mlx", mlx_only)
    assert choose_engine(both / "model.gguf", "auto", ["llamacpp", "mlx"]) == ("llamacpp", both / "model.gguf")


def test_engine_flag_narrows_and_shards_need_a_ring(both: Path) -> None:
    assert choose_engine(both, "mlx", ["llamacpp", "mlx"]) == ("mlx", both)
    assert choose_engine(both, "auto", ["llamacpp", "mlx"], pipelined=True) == ("mlx", both)
    with pytest.raises(NoEngineForModel, match="can run .* for a pipeline group"):
        choose_engine(both, "llamacpp", ["llamacpp", "mlx"], pipelined=True)
    with pytest.raises(NoEngineForModel, match=r"engine llamacpp is not installed.*pip install xllamacpp"):
        choose_engine(both, "llamacpp", ["mlx"])
    with pytest.raises(NoEngineForModel, match="MLX needs an mlx-lm folder"):
        choose_engine(both / "model.gguf", "mlx", ["llamacpp", "mlx"])
