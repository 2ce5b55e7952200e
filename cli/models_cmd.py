"""`exojet models list | import-gguf`."""

from __future__ import annotations

import argparse
from pathlib import Path

from exojet.cli.options import Subparsers, add_models_dir
from exojet.cli.render import table

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="the models dir: list, import-gguf")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="complete models with their sizes")
    add_models_dir(q)
    q.set_defaults(func=lambda args: list_models_cmd(args.models_dir))
    q = msub.add_parser("import-gguf", help="import a llama GGUF (Q4_0, Q4_1, Q8_0, F16, F32) as an mlx-lm model")
    q.add_argument("path", type=Path, help="the GGUF file")
    q.add_argument("--name", required=True, help="model id to import it as, e.g. local/my-llama")
    q.add_argument(
        "--dtype",
        default=DTYPES[0],
        choices=DTYPES,
        help="scales, biases and dense tensors (float32 is fastest on a CPU)",
    )
    q.add_argument("--dequantize", action="store_true", help="write dense weights instead of quantized ones")
    add_models_dir(q)
    q.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    return import_gguf_cmd(args.path, args.name, args.models_dir, args.dtype, args.dequantize)


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
