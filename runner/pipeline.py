"""Pipeline parallelism over the MLX ring backend.

A group of ``world_size`` processes serves one model: rank ``r`` holds the
contiguous layers ``[start_layer, end_layer)`` (ranks in layer order, rank 0
holds the first layers), receives the hidden states from rank ``r - 1``, runs
its layers with its own KV cache and sends the result to rank ``r + 1``. The
last rank's hidden states are then shared with every rank (one ``all_gather``)
so that every rank computes the same logits and its sampler picks the same
token: ``mlx_lm.stream_generate`` runs unchanged, in lockstep, on every rank.

Joining the ring group (and what the ring does when a peer goes away) is
`runner/ring.py`.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, cast

import mlx.core as mx
from loguru import logger
from mlx import nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.base import create_attention_mask
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_load

# Model types whose inner model is exactly ``embed_tokens -> layers(h, mask,
# cache) -> norm``: our pipeline stage reproduces that forward pass.
# ("mistral" is loaded by mlx-lm as llama.)
PIPELINE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def split_layers(n_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Split ``n_layers`` into contiguous ``[start, end)`` ranges, one per weight.

    Each rank gets a share proportional to its weight (e.g. its free memory),
    at least one layer; the ranges cover every layer in order.
    """
    if not weights:
        raise ValueError("weights must not be empty")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    if n_layers < len(weights):
        raise ValueError(f"cannot give {len(weights)} ranks at least one of {n_layers} layers")
    total = sum(weights)
    ranges: list[tuple[int, int]] = []
    start = 0
    cumulative = 0.0
    for i, w in enumerate(weights):
        cumulative += w
        ranks_after = len(weights) - i - 1
        end = round(n_layers * cumulative / total)
        # Keep one layer for this rank and one for every rank after it.
        end = min(max(end, start + 1), n_layers - ranks_after)
        ranges.append((start, end))
        start = end
    return ranges


class PipelineStage(nn.Module):
    """Replaces a model's inner ``model``: embeddings, this rank's layers, norm.

    ``layers`` holds only the local layers, so ``model.layers``,
    ``model.make_cache()`` and ``mlx_lm.models.cache.make_prompt_cache`` make
    KV caches for the local layers only. The embeddings and the final norm
    stay on every rank: ``recv_like`` needs the hidden states' shape, and
    every rank computes the logits itself so that no logits cross the wire.
    """

    def __init__(self, inner: nn.Module, group: mx.distributed.Group, start: int, end: int) -> None:
        # Not super(): mlx leaves Module.__init__ unannotated, and mypy's untyped_calls_exclude
        # does not reach a call through super().
        nn.Module.__init__(self)
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers[start:end]
        self.norm = inner.norm
        self.sliding_window = getattr(inner, "sliding_window", None)
        self.start_layer = start
        self.end_layer = end
        self._group = group
        # This rank was asked to stop; every rank learns it through the step's stop sum.
        self.stop_asked = False
        # The stop sums of the two newest steps (generate_step builds one step ahead).
        self._stop_sums: deque[mx.array] = deque(maxlen=2)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """Run this rank's layers between the previous and the next rank."""
        rank, size = self._group.rank(), self._group.size()
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)

        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self._group)

        masks: dict[bool, Any] = {}
        for layer, c in zip(self.layers, cache, strict=True):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                window = self.sliding_window if sliding else None
                masks[sliding] = create_attention_mask(h, c, window_size=window)
            h = layer(h, masks[sliding], cache=c)

        if rank < size - 1:
            h = mx.distributed.send(h, rank + 1, group=self._group)
            # generate_step evaluates only the caches during prefill: tie the
            # send to them or it would never run and the next rank would wait.
            if cache[-1] is not None:
                cache[-1].keys = mx.depends(cache[-1].keys, h)

        # Every rank takes the last rank's hidden states, inside the graph. Each rank's
        # stop flag rides along as one more element (0 or 1, exact in any float type): every
        # rank then reads the same sum for the same step and stops at the same token, with
        # no collective beyond the one each step already makes.
        flag = mx.array([float(self.stop_asked)], dtype=h.dtype)
        gathered = mx.distributed.all_gather(mx.concatenate([h.reshape(-1), flag]), group=self._group)
        rows = gathered.reshape(size, -1)
        self._stop_sums.append(rows[:, -1].sum())
        hidden: mx.array = self.norm(rows[size - 1, :-1].reshape(h.shape))
        return hidden

    def stop_agreed(self) -> bool:
        """Whether some rank asked to stop by the step that produced the newest token.

        Called once per token from generate's loop: the newest step is the one queued
        ahead, so the token's own step is the one before it (evaluated already).
        """
        return len(self._stop_sums) == 2 and self._stop_sums[0].item() != 0


def make_pipelined(model: nn.Module, group: mx.distributed.Group, start_layer: int, end_layer: int) -> nn.Module:
    """Turn ``model`` (lazy or loaded) into this rank's pipeline stage, in place.

    Layers outside ``[start_layer, end_layer)`` are dropped, so when the model
    was loaded lazily their weights are never read. Every rank of ``group``
    must call this with its own range; the ranges must be contiguous and in
    rank order (checked across the group). Supports the model types in
    ``PIPELINE_MODEL_TYPES``. mlx-lm's own ``model.model.pipeline()`` is not
    used: it gives rank 0 the *last* layers, contrary to our shard layout.
    """
    model_type = getattr(model, "model_type", None)
    if model_type not in PIPELINE_MODEL_TYPES:
        raise NotImplementedError(f"pipeline parallelism supports {sorted(PIPELINE_MODEL_TYPES)}, not {model_type!r}")
    n_layers = len(model.model.layers)
    if not 0 <= start_layer < end_layer <= n_layers:
        raise ValueError(f"layers [{start_layer}, {end_layer}) are not within 0..{n_layers}")
    gathered = mx.distributed.all_gather(
        mx.array([[start_layer, end_layer]], dtype=mx.int32), group=group, stream=mx.cpu
    )
    ranges = cast(list[list[int]], gathered.tolist())
    expected_start = 0
    for r, (s, e) in enumerate(ranges):
        if s != expected_start:
            raise ValueError(f"rank {r} holds [{s}, {e}) but should start at {expected_start}: {ranges}")
        expected_start = e
    if expected_start != n_layers:
        raise ValueError(f"the ranks' layers {ranges} do not cover all {n_layers} layers")
    model.model = PipelineStage(model.model, group, start_layer, end_layer)
    logger.info(
        "rank {}/{}: pipeline stage with layers [{}, {}) of {}",
        group.rank(),
        group.size(),
        start_layer,
        end_layer,
        n_layers,
    )
    return model


def load_shard(
    model_path: str | Path,
    group: mx.distributed.Group,
    start_layer: int,
    end_layer: int,
    on_layer: Callable[[int, int], None],
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load only layers ``[start_layer, end_layer)`` of an mlx-lm model folder,
    calling ``on_layer(done, end_layer - start_layer)`` after each layer.

    The weights are opened lazily and the other layers are dropped before
    anything is evaluated, so they never occupy memory. Returns once every
    rank has loaded its shard.
    """
    model, tokenizer = cast(tuple[nn.Module, TokenizerWrapper], mlx_load(str(model_path), lazy=True))
    make_pipelined(model, group, start_layer, end_layer)
    layers = model.model.layers
    for done, layer in enumerate(layers, start=1):
        mx.eval(layer.parameters())
        on_layer(done, len(layers))
    mx.eval(model.parameters())
    # A barrier, so that no rank starts generating while another still loads.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


def pipeline_barrier(
    group: mx.distributed.Group,
    stream: mx.Stream | mx.ThreadLocalStream = generation_stream,
) -> None:
    """Return once every rank has finished the pipeline work it queued.

    ``generate_step`` queues one step beyond the last token it yields, on
    every rank. A rank that moves on (exits, or stops taking part) before
    its peers have finished that step breaks their ring connection, so call
    this on every rank after each generation, from the generating thread,
    with the stream it generated on (mlx-lm's default is thread-local).
    """
    mx.synchronize(stream)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


class StallWatchdog:
    """Ends the process if no progress is reported for about ``timeout_s`` seconds.

    A stalled ring peer makes the ring wait forever and nothing in the process
    can interrupt it. Some of those waits hold the GIL (``mx.clear_cache()``,
    which ``generate_step`` calls every 256 tokens, synchronises the streams
    without releasing it), so no Python thread could act: this uses
    ``faulthandler``'s C watchdog thread instead. On a stall it writes
    ``Timeout (h:mm:ss)!`` and every thread's Python stack to stderr and exits
    with status 1. The timer is process-global (one per process). Use it
    around generation and call :meth:`beat` for every token::

        with StallWatchdog(20.0) as watchdog:
            for response in stream_generate(...):
                watchdog.beat()
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        # Re-arming starts a new C thread; doing it at most every tenth of
        # the timeout keeps beat() cheap at thousands of tokens per second.
        self._rearm_every = timeout_s / 10
        self._armed_at = 0.0

    def __enter__(self) -> Self:
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()

    def beat(self) -> None:
        """Report progress (one token generated)."""
        if time.monotonic() - self._armed_at >= self._rearm_every:
            self._arm()

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
