"""`exojet models list | import-gguf`."""

from __future__ import annotations

from pathlib import Path

from exojet.cli.render import table


def list_models_cmd(models_dir: Path) -> int:
    """Print the complete models in `models_dir` with their sizes."""
    from exojet.models.gguf_import import list_models

    found = list_models(models_dir)
    if not found:
        print(f"no models in {models_dir}")
        return 0
    print(f"models in {models_dir}\n")
    print(table(["MODEL", "SIZE"], [[model_id, f"{size / 1e6:.1f} MB"] for model_id, size in found]))
    return 0


def import_gguf_cmd(path: Path, name: str, models_dir: Path, dtype: str, dequantize: bool) -> int:
    """Import a llama GGUF file as model `name`."""
    from exojet.models.gguf_import import GGUFImportError, import_gguf
    from exojet.models.store import InvalidModelId

    if not path.is_file():
        print(f"error: no such file: {path}")
        return 2
    try:
        folder = import_gguf(path, name, models_dir, dtype=dtype, dequantize=dequantize)
    except (GGUFImportError, InvalidModelId, ValueError) as err:
        print(f"error: {err}")
        return 1
    print(f"imported {name} into {folder}")
    return 0
