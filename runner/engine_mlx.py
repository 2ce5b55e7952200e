"""MLX (mlx-lm) in the engine child: a whole model, or a pipeline rank's shard in a ring group.

A whole model is loaded lazily and materialised a layer at a time (each reported), then
turned into dense float32 where that is faster and fits (`runner.mlx_cpu`); its chats are
batched (`runner.mlx_batch`: as many at once as memory allows). In a group every rank runs
one chat at a time, in the same steps: no rank may stop on its own (a cancel is passed to the
others through the pipeline's stop sum and every rank stops at the same token), a stalled
peer ends the process, and a ring error ends it with RING_BROKEN_EXIT.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
from loguru import logger

from exojet.runner.engine_backend import RequestError, check_fits, raw_prompt
from exojet.runner.engine_protocol import RING_BROKEN_EXIT, Done, Generate, Load, ModelLoaded
from exojet.runner.mlx_batch import (
    BatchDriver,
    Capacity,
    chat_capacity,
    kv_bytes_per_token,
    make_chat_sampler,
)
from exojet.runner.mlx_cpu import choose_weights, to_dense_float32
from exojet.runner.stop_scanner import StopScanner

# A pipeline rank that sees no token for this long takes its peers for dead
# (a stalled peer would otherwise hold the ring forever); env overrides.
STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_STALL_S", "30"))
LOAD_STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_LOAD_STALL_S", "300"))
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A batched chat waiting for its next token looks at its cancel flag this often.
CANCEL_POLL_S = 0.05
# MLX's random keys are 64-bit.
SEEDS = 2**64


def _shard_range(req: Load, n_layers: int, path: Path) -> tuple[int, int]:
    """The layers [start, end) a Load asks for (all by default), checked against the model's."""
    start = 0 if req.start_layer is None else req.start_layer
    end = n_layers if req.end_layer is None else req.end_layer
    if not 0 <= start < end <= n_layers:
        raise RequestError(
            "InvalidShard", f"layers [{start}, {end}) are not a range of the {n_layers} layers of {path}"
        )
    return start, end


def _context_length(config: dict[str, Any]) -> int | None:
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
    return sum(a.nbytes for a in shared) + sum(a.nbytes for arrays in by_layer.values() for a in arrays)


@contextlib.contextmanager
def ring_guard() -> Iterator[None]:
    """A ring error (a peer gone) ends this process: its group cannot be rebuilt in it."""
    try:
        yield
    except RuntimeError as exc:
        if "[ring]" not in str(exc):
            raise
        logger.error("pipeline peer lost: {}", exc)
        os._exit(RING_BROKEN_EXIT)


class MlxEngine:
    """An mlx-lm model (or a pipeline rank's shard of one) in this process."""

    engine = "mlx"

    def __init__(self, req: Load, group: Any, on_layer: Callable[[int, int], None]) -> None:
        self.group = group
        self.model: Any = None
        self.tokenizer: Any = None
        self._context: int | None = None
        # Chats at once: a whole model's are batched by `_batch`; a pipeline rank serves one.
        self.capacity = 1
        self._capacity_reason = "a pipeline rank serves one chat at a time"
        self._batch: BatchDriver | None = None
        self._started = time.perf_counter()
        path = Path(req.model_path)
        if group is not None:
            self._loaded = self._load_shard(req, path, on_layer)
        else:
            self._loaded = self._load_whole(req, path, on_layer)

    @property
    def context_length(self) -> int | None:
        return self._context

    def loaded(self) -> ModelLoaded:
        return self._loaded

    def _load_whole(self, req: Load, path: Path, on_layer: Callable[[int, int], None]) -> ModelLoaded:
        import psutil
        from mlx_lm.utils import load_model, load_tokenizer

        try:
            # mlx_lm would try the Hugging Face hub for a missing path; a runner
            # only loads what it downloaded, so a missing folder is an error here.
            if not path.is_dir():
                raise FileNotFoundError(f"{path} is not a directory")
            model, config = load_model(path, lazy=True)
            tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        except Exception as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        n_layers = len(model.layers)
        start, end = _shard_range(req, n_layers, path)
        weight_bytes = materialise(model, start, end, on_layer)
        free = psutil.virtual_memory().available
        weights, reason = choose_weights(model, (start, end) == (0, n_layers), req.weights, free)
        if weights == "dense":
            weight_bytes = to_dense_float32(model)
        self.model, self.tokenizer = model, tokenizer
        self._context = _context_length(config)
        self._start_batching()
        return self._report(path, config, n_layers, (start, end), weight_bytes, weights, reason)

    def _start_batching(self) -> None:
        """Size the batch by the memory left once the weights are in, and start its driver."""
        import psutil

        per_token = kv_bytes_per_token(self.model)
        if per_token is None:
            capacity = Capacity(1, "mlx-lm cannot batch this model's KV caches")
        else:
            capacity = chat_capacity(psutil.virtual_memory().available, per_token, self._context)
        self.capacity, self._capacity_reason = capacity.chats, capacity.reason
        if capacity.chats > 1:
            self._batch = BatchDriver(self.model, list(self.tokenizer.eos_token_ids), capacity)

    def _load_shard(self, req: Load, path: Path, on_layer: Callable[[int, int], None]) -> ModelLoaded:
        from mlx.utils import tree_flatten

        from exojet.runner.pipeline import StallWatchdog, load_shard

        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        n_layers = int(config["num_hidden_layers"])
        start, end = _shard_range(req, n_layers, path)
        # A rank that failed before loading never joins the collectives the
        # others wait in: the watchdog turns that wait into a bounded failure.
        with ring_guard(), StallWatchdog(LOAD_STALL_TIMEOUT_S):
            self.model, self.tokenizer = load_shard(path, self.group, start, end, on_layer)
        self._context = _context_length(config)
        params: dict[str, Any] = {}
        tree_flatten(self.model.parameters(), destination=params)
        weight_bytes = sum(a.nbytes for a in params.values())
        return self._report(path, config, n_layers, (start, end), weight_bytes, "stored", "a pipeline shard")

    def _report(
        self,
        path: Path,
        config: dict[str, Any],
        n_layers: int,
        shard: tuple[int, int],
        weight_bytes: int,
        weights: str,
        reason: str,
    ) -> ModelLoaded:
        """The reply to a Load of MLX weights, logged."""
        seconds = time.perf_counter() - self._started
        start, end = shard
        logger.bind(model=str(path), start=start, end=end).info(
            "loaded {} bytes of weights ({}: {}) in {:.2f} s; {}",
            weight_bytes,
            weights,
            reason,
            seconds,
            self._capacity_reason,
        )
        return ModelLoaded(
            n_layers=n_layers,
            start_layer=start,
            end_layer=end,
            model_type=str(config.get("model_type", "")),
            weight_bytes=weight_bytes,
            load_seconds=seconds,
            weights=weights,
            weights_reason=reason,
            engine=self.engine,
            chat_capacity=self.capacity,
        )

    def close(self) -> None:
        """Drop the model and return its memory to the system."""
        import mlx.core as mx

        if self._batch is not None:
            self._batch.close()
            self._batch = None
        self.model = self.tokenizer = None
        gc.collect()
        mx.clear_cache()

    def generate(self, req: Generate, emit: Callable[[str], None] | None, cancelled: Callable[[], bool]) -> Done:
        started = time.perf_counter()
        if req.tools or req.response_format is not None:
            # Refused, not ignored: an answer that skipped its constraint would look like one.
            raise RequestError("InvalidRequest", "MLX serves no tool calls or response_format yet (issue 30)")
        try:
            # A chat template may refuse a role it does not know.
            prompt = (
                self.tokenizer.encode(raw_prompt(req))
                if req.raw
                else self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in req.messages],
                    add_generation_prompt=True,
                )
            )
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError("InvalidRequest", f"the model cannot take these messages: {exc}") from exc
        if not prompt:
            raise RequestError("InvalidRequest", "the prompt is empty")
        if req.seed is not None and not 0 <= req.seed < SEEDS:
            raise RequestError("InvalidRequest", f"seed {req.seed} is not in [0, 2**64): MLX cannot hold it")
        check_fits(len(prompt), req.max_tokens, self._context)
        call = _Call(req, prompt, emit, cancelled, started)
        if self._batch is not None:
            return self._generate_batched(self._batch, call)
        return self._generate_alone(call)

    def _generate_batched(self, batch: BatchDriver, call: _Call) -> Done:
        """The chat among the others of the batch: its tokens come from the driver thread."""
        chat = batch.submit(call.prompt, call.req)
        detokenizer = self.tokenizer.detokenizer
        scanner = StopScanner(call.req.stop)
        first_at = None
        finish: Literal["stop", "length", "cancelled"] = "length"
        completion_tokens = 0
        try:
            while True:
                if call.cancelled():
                    finish = "cancelled"
                    break
                # Bounded, so a cancel is seen while a long prompt is prefilled.
                step = chat.next_step(CANCEL_POLL_S)
                if step is None:
                    continue
                first_at = first_at or time.perf_counter()
                # The end-of-sequence token ends a generation without being part of it.
                if step.finish != "stop":
                    detokenizer.add_token(step.token)
                    completion_tokens += 1
                if step.finish is not None:
                    detokenizer.finalize()
                delta, stopped = scanner.feed(detokenizer.last_segment)
                if call.emit is not None and delta:
                    call.emit(delta)
                if stopped or step.finish is not None:
                    finish = "stop" if stopped else step.finish or "length"
                    break
        finally:
            chat.leave()
        return _done(scanner, call, finish, completion_tokens, first_at)

    def _generate_alone(self, call: _Call) -> Done:
        """The chat on its own (a pipeline rank in step with the others, or a model whose
        caches mlx-lm cannot batch)."""
        from mlx_lm import stream_generate

        from exojet.runner.pipeline import StallWatchdog, pipeline_barrier

        scanner = StopScanner(call.req.stop)
        first_at = None
        finish: Literal["stop", "length", "cancelled"] = "length"
        completion_tokens = 0
        in_group = self.group is not None
        stage = self.model.model if in_group else None
        if stage is not None:
            stage.stop_asked = False
        watchdog = StallWatchdog(STALL_TIMEOUT_S) if in_group else None
        sampler = make_chat_sampler(call.req)
        with ring_guard(), watchdog or contextlib.nullcontext():
            for response in stream_generate(
                self.model, self.tokenizer, call.prompt, max_tokens=call.req.max_tokens, sampler=sampler
            ):
                if watchdog is not None:
                    watchdog.beat()
                if first_at is None:
                    first_at = time.perf_counter()
                # The eos token ends a generation without being part of it.
                eos = response.finish_reason == "stop"
                completion_tokens = response.generation_tokens - (1 if eos else 0)
                delta, stopped = scanner.feed(response.text)
                if call.emit is not None and delta:
                    call.emit(delta)
                if stopped or eos:
                    finish = "stop"
                    break
                if call.cancelled():
                    if stage is None:
                        finish = "cancelled"
                        break
                    stage.stop_asked = True
                if stage is not None and stage.stop_agreed():
                    finish = "cancelled"
                    break
            if in_group:
                pipeline_barrier(self.group)
        return _done(scanner, call, finish, completion_tokens, first_at)


class _Call(msgspec.Struct, frozen=True):
    """One generation as the engine took it: the request, its prompt's tokens, where its text goes."""

    req: Generate
    prompt: list[int]
    emit: Callable[[str], None] | None
    cancelled: Callable[[], bool]
    started: float


def _done(
    scanner: StopScanner,
    call: _Call,
    finish: Literal["stop", "length", "cancelled"],
    completion_tokens: int,
    first_at: float | None,
) -> Done:
    """A generation's end: the text held back for a possible stop string sent, its numbers."""
    tail = scanner.flush()
    if call.emit is not None and tail:
        call.emit(tail)
    ended = time.perf_counter()
    first_at = first_at or ended
    # Decode speed: the tokens after the first, over the time after the first.
    decode_seconds = ended - first_at
    decoded = completion_tokens - 1
    return Done(
        text=scanner.text,
        finish_reason=finish,
        prompt_tokens=len(call.prompt),
        completion_tokens=completion_tokens,
        tokens_per_second=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
        time_to_first_token=first_at - call.started,
    )
