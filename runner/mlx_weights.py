"""A model's weights as MLX loads them: the layers a Load asks for, the model's window, and the
weights of a shard's layers read a layer at a time (each reported)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exojet.runner.engine_backend import RequestError
from exojet.runner.engine_protocol import Load

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def shard_range(req: Load, n_layers: int, path: Path) -> tuple[int, int]:
    """The layers [start, end) a Load asks for (all by default), checked against the model's."""
    start = 0 if req.start_layer is None else req.start_layer
    end = n_layers if req.end_layer is None else req.end_layer
    if not 0 <= start < end <= n_layers:
        raise RequestError(
            "InvalidShard", f"layers [{start}, {end}) are not a range of the {n_layers} layers of {path}"
        )
    return start, end


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context window, as its config states it (llama-style configs do)."""
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def materialise(model: Any, start: int, end: int, on_layer: Callable[[int, int], None]) -> int:
    """Evaluate the weights that layers [start, end) need, a layer at a time, calling
    `on_layer(done, end - start)` after each; return their bytes.

    Lazy loading maps the weights without reading them; evaluating only the shard's
    layers (plus the embeddings on the first shard and the norm and head on the
    last) keeps the other shards' weights out of memory.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    n_layers = len(model.layers)
    params: dict[str, Any] = {}
    tree_flatten(model.parameters(), destination=params)
    tied = not any(name.startswith("lm_head.") for name in params)
    shared: list[Any] = []
    by_layer: dict[int, list[Any]] = {index: [] for index in range(start, end)}
    for name, array in params.items():
        match = _LAYER_INDEX.search(name)
        if match:
            index = int(match.group(1))
            if start <= index < end:
                by_layer[index].append(array)
        # Tied embeddings are also the output head, needed by the last shard.
        elif ("embed" in name and (start == 0 or (tied and end == n_layers))) or (
            "embed" not in name and end == n_layers
        ):
            shared.append(array)
    mx.eval(shared)
    for done, arrays in enumerate(by_layer.values(), start=1):
        mx.eval(arrays)
        on_layer(done, end - start)
    loaded: int = sum(a.nbytes for a in shared) + sum(a.nbytes for arrays in by_layer.values() for a in arrays)
    return loaded
