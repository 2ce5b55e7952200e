"""MLX's fastest path on a CPU: a multithreaded BLAS and dense float32 weights.

MLX's CPU quantized matmul is single-threaded and reads weights at a small fraction of
memory bandwidth, and the BLAS bundled with the `mlx[cpu]` wheel is the single-threaded
reference one. So on a CPU a dequantized (dense float32) model through a multithreaded
BLAS is several times faster than the quantized model it came from, and it computes with
the same weights.

- The parent (`runner.engine`) gives the engine child Debian's pthread OpenBLAS through
  `LD_PRELOAD` when the library is installed (`apt-get install libopenblas0-pthread`);
  `EXO_ENGINE_BLAS` names another library, or `none`.
- The child, once a whole quantized model is loaded on the CPU, dequantizes it to float32
  when that fits comfortably in free memory (at most DENSE_MAX_FREE_FRACTION of it), and
  keeps the stored weights otherwise.
Each decision comes with its reason, for the runner's log and its registration.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from exojet.runner.engine_protocol import WeightsChoice

# Debian's libopenblas0-pthread (any architecture's multiarch dir).
OPENBLAS_PTHREAD_GLOB = "/usr/lib/*/openblas-pthread/libopenblas.so.0"
BLAS_ENV = "EXO_ENGINE_BLAS"
# Dense weights must leave most of the free memory to the KV cache, other processes
# and the page cache.
DENSE_MAX_FREE_FRACTION = 0.5


class Blas(msgspec.Struct, frozen=True):
    """The BLAS library the engine child gets preloaded (None: MLX's own), and why."""

    library: str | None
    reason: str


def find_blas(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> Blas:
    """Which BLAS the engine child should preload on this machine."""
    wanted = environ.get(BLAS_ENV, "")
    if wanted == "none":
        return Blas(None, f"MLX's own BLAS (${BLAS_ENV}=none)")
    if wanted:
        if not os.path.isfile(wanted):
            return Blas(None, f"MLX's own BLAS: ${BLAS_ENV}={wanted} is not a file")
        return Blas(wanted, f"${BLAS_ENV}")
    if platform != "linux":
        return Blas(None, "MLX's own BLAS (not Linux)")
    found = sorted(glob.glob(OPENBLAS_PTHREAD_GLOB))
    if not found:
        return Blas(None, "MLX's own single-threaded BLAS: libopenblas0-pthread is not installed")
    return Blas(found[0], "multithreaded OpenBLAS found")


def child_env(blas: Blas, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The engine child's environment: ours, with the BLAS preloaded first."""
    env = dict(environ)
    if blas.library is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (blas.library, environ.get("LD_PRELOAD", "")) if p)
    return env


def describe(blas: Blas) -> str:
    """The engine's CPU setup in one line, for the runner's registration and log."""
    library = blas.library or "MLX's own"
    return (
        f"BLAS: {library} ({blas.reason}); weights: dense float32 when a whole quantized model so "
        f"expanded takes at most {DENSE_MAX_FREE_FRACTION:.0%} of the free memory on a CPU, else as stored"
    )


def _quantized_layers(model: Any) -> dict[str, int]:
    """The names of `model`'s quantized layers (those mlx-lm can dequantize), with their bits."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return {name: module.bits for name, module in model.named_modules() if isinstance(module, quantized)}


def dense_float32_bytes(model: Any) -> int:
    """The bytes of `model`'s parameters once dequantized and cast to float32."""
    from mlx.utils import tree_flatten

    bits = _quantized_layers(model)
    params: dict[str, Any] = {}
    tree_flatten(model.parameters(), destination=params)
    elements = 0
    for name, array in params.items():
        owner, _, leaf = name.rpartition(".")
        if owner not in bits:
            elements += array.size
        elif leaf == "weight":
            # Packed: each 32-bit word holds 32 / bits values.
            elements += array.size * 32 // bits[owner]
        elif leaf == "bias":
            elements += array.size
        # A quantized layer's scales and biases disappear with dequantization.
    return elements * 4


def choose_weights(
    model: Any, whole_model: bool, choice: WeightsChoice, free_bytes: int
) -> tuple[Literal["stored", "dense"], str]:
    """Whether to run `model` dense float32 or as stored, and why."""
    import mlx.core as mx

    if choice != "auto":
        return choice, "asked for"
    if not _quantized_layers(model):
        return "stored", "the model is not quantized"
    if mx.default_device().type != mx.DeviceType.cpu:
        return "stored", f"quantized kernels are the fast path on {mx.default_device()}"
    if not whole_model:
        return "stored", "a layer range: only its own layers are in memory"
    dense = dense_float32_bytes(model)
    limit = int(free_bytes * DENSE_MAX_FREE_FRACTION)
    numbers = f"{dense / 1e6:.0f} MB dense float32, {free_bytes / 1e6:.0f} MB free"
    if dense > limit:
        return "stored", f"{numbers}: over {DENSE_MAX_FREE_FRACTION:.0%} of the free memory"
    return "dense", f"{numbers}: faster on a CPU than the quantized kernels"


def to_dense_float32(model: Any) -> int:
    """Dequantize `model`'s quantized layers and cast its floating parameters to float32,
    in place; returns the parameters' bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.set_dtype(mx.float32)
    params: dict[str, Any] = {}
    tree_flatten(model.parameters(), destination=params)
    mx.eval(list(params.values()))
    return sum(a.nbytes for a in params.values())
