"""Where models live on disk: the models directory and one folder per repo id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from exojet.bus.model_ids import model_id_problem

# Files that make an mlx-lm model folder usable, beyond the weights.
REQUIRED_FILES = ("config.json",)
WEIGHT_SUFFIX = ".safetensors"


class InvalidModelId(ValueError):
    """The model id is not a repo id, or would resolve outside the models dir."""


def default_models_dir() -> Path:
    """`$EXO_MODELS_DIR`, else `$XDG_DATA_HOME/exo/models` (`~/.local/share/exo/models`)."""
    if env := os.environ.get("EXO_MODELS_DIR"):
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "exo" / "models"


def validate_model_id(model_id: str) -> str:
    """Return `model_id` if it is a safe repo id, else raise InvalidModelId saying why."""
    if problem := model_id_problem(model_id):
        raise InvalidModelId(problem)
    return model_id


def model_dir(models_dir: Path, model_id: str) -> Path:
    """The folder of `model_id` inside `models_dir` (`org/name` -> `org--name`)."""
    validate_model_id(model_id)
    root = models_dir.resolve()
    path = (root / model_id.replace("/", "--")).resolve()
    if path.parent != root:
        raise InvalidModelId(f"model id {model_id!r} escapes the models directory {root}")
    return path


def is_complete(path: Path) -> bool:
    """True if `path` holds a loadable model: config, weights, and every indexed shard."""
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(p.suffix == WEIGHT_SUFFIX for p in path.iterdir())


def layer_count(path: Path) -> int | None:
    """`num_hidden_layers` (or `n_layers`) of the model's config.json in `path`, if it says."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("num_hidden_layers", config.get("n_layers")) if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def size_on_disk(path: Path) -> int:
    """Bytes of the model's files (what loading it whole reads)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
