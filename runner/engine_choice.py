"""Which engine runs a model on this machine, decided per model at LoadModel.

An engine runs a model format: MLX an mlx-lm folder (config.json and safetensors),
llama.cpp a GGUF file (or a folder holding one, as the default model's folder does
next to its MLX weights). `auto` takes the fastest engine installed that can run
the model: MLX on Apple silicon (Metal), llama.cpp elsewhere (MLX's CPU quantized
matmul is single-threaded; llama.cpp was 7x faster generating on a 2-core CPU). Both are
in the default install (llama.cpp through xllamacpp's prebuilt wheels).
`--engine mlx|llamacpp` narrows the choice to one engine.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path
from typing import Literal

from exojet.bus.events import PIPELINE_ENGINES

EngineName = Literal["mlx", "llamacpp"]
EngineWanted = Literal["auto", "mlx", "llamacpp"]
ENGINES: tuple[EngineName, ...] = ("mlx", "llamacpp")
_MODULES = {"mlx": "mlx_lm", "llamacpp": "xllamacpp"}


class NoEngineForModel(Exception):
    """No engine installed (and allowed) on this runner can run the model."""


def installed_engines() -> list[EngineName]:
    """The engines whose library is importable here, fastest first."""
    return [e for e in preference() if importlib.util.find_spec(_MODULES[e]) is not None]


def preference() -> tuple[EngineName, ...]:
    """Engines fastest first on this machine."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return ("mlx", "llamacpp")
    return ("llamacpp", "mlx")


def gguf_file(path: Path) -> Path | None:
    """The GGUF a model path names: the file itself or the first one in the folder."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir():
        return next(iter(sorted(path.glob("*.gguf"))), None)
    return None


def runs_on(path: Path, engine: EngineName) -> Path | None:
    """What `engine` loads for the model at `path`, or None if it cannot run it."""
    if engine == "llamacpp":
        return gguf_file(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return None


def choose_engine(
    path: Path, wanted: EngineWanted, installed: list[EngineName], pipelined: bool = False
) -> tuple[EngineName, Path]:
    """(engine, what it loads) for the model at `path`; raises NoEngineForModel saying why."""
    allowed = [e for e in installed if wanted in ("auto", e) and (not pipelined or e in PIPELINE_ENGINES)]
    for engine in allowed:
        target = runs_on(path, engine)
        if target is not None:
            return engine, target
    if wanted != "auto" and wanted not in installed:
        hint = " (pip install xllamacpp)" if wanted == "llamacpp" else ""
        raise NoEngineForModel(f"engine {wanted} is not installed on this runner{hint}")
    what = "a pipeline group" if pipelined else "it"
    raise NoEngineForModel(
        f"no engine of this runner ({', '.join(allowed) or 'none allowed'}) can run {path} for {what}: "
        "MLX needs an mlx-lm folder, llama.cpp a GGUF file"
    )
