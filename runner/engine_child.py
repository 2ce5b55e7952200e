"""The engine child process of the runner: `python -m exojet.runner.engine_child`.

It runs MLX (mlx-lm) or llama.cpp (`runner.engine_llamacpp`), as each Load says, and
serves the requests of `runner.engine_protocol` one at a time on its stdin and
stdout. Stdout is kept for the protocol only: the original descriptors are
duplicated for the protocol and fd 0/1 are pointed at /dev/null and stderr, so a
stray `print` or a C library writing to stdout cannot corrupt a frame.

Handlers are looked up by request type, so a pipelined deployment can add its own
request (joining a group) and load path without touching the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import psutil
from loguru import logger

from exojet.runner.engine_pipe import Pipe
from exojet.runner.engine_protocol import (
    Cancel,
    ConnectGroup,
    Done,
    Exit,
    Generate,
    GroupConnected,
    LayersLoaded,
    Load,
    Message,
    ModelLoaded,
    Ok,
    Reply,
    Request,
    RequestFailed,
    Token,
    Unload,
    Warmup,
)
from exojet.runner.mlx_cpu import choose_weights, to_dense_float32
from exojet.runner.stop_scanner import StopScanner

WARMUP_TOKENS = 4
# A pipeline rank that sees no token for this long takes its peers for dead
# (a stalled peer would otherwise hold the ring forever); env overrides.
STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_STALL_S", "30"))
LOAD_STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_LOAD_STALL_S", "300"))
# Exit status of a child whose ring broke: it cannot be used again.
RING_BROKEN_EXIT = 3
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class RequestError(Exception):
    """A request that cannot be served, with the error type the parent will see."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# Text generated faster than this is written to the pipe in one frame: the runner, its NATS
# server, the API and the client share the cores with the engine, and each frame costs them
# about 2.4 ms of CPU in all, taken from llama.cpp's threads on a 2-core machine: a frame per
# 20 ms cost it 6-8% of its speed, one per 50 ms (20 a second, still a smooth stream) 2-3%.
TOKEN_FLUSH_S = 0.05
# After its first token, llama.cpp (whose threads take every core) waits this long before it
# computes the second, so that the runner, the NATS server, the API and the client carry the
# first token out instead of queueing for a core behind the second one. Paired runs (every
# other request with it, same stack) gave a first token through HTTP 1.4 and 3.8 ms earlier;
# it costs each answer 3 ms (under 1% of a 64-token answer's decode time).
FIRST_TOKEN_HANDOFF_S = 0.003


class TokenWriter:
    """Streams generated text to the parent: the first piece at once, then at most one frame
    every TOKEN_FLUSH_S (a piece waits at most until the next token or the end)."""

    def __init__(self, pipe: Pipe | None) -> None:
        self.pipe = pipe
        self.held: list[str] = []
        self.written_at: float | None = None
        self.handed_off = False

    def write(self, text: str) -> None:
        if self.pipe is None or not text:
            return
        self.held.append(text)
        if self.written_at is None or time.perf_counter() - self.written_at >= TOKEN_FLUSH_S:
            self.flush()

    def hand_off(self) -> None:
        """Between two tokens: once the first frame is out, pause FIRST_TOKEN_HANDOFF_S, once."""
        if self.written_at is not None and not self.handed_off:
            self.handed_off = True
            time.sleep(FIRST_TOKEN_HANDOFF_S)

    def flush(self) -> None:
        if self.pipe is not None and self.held:
            self.pipe.write(Token(text="".join(self.held)))
            self.held.clear()
            self.written_at = time.perf_counter()


def _check_fits(prompt_tokens: int, max_tokens: int, context_length: int | None) -> None:
    """Refuse, before any work, a chat that cannot fit the context window (None: unknown)."""
    if context_length and prompt_tokens + max_tokens > context_length:
        raise RequestError(
            "ContextLengthExceeded",
            f"the prompt is {prompt_tokens} tokens and max_tokens {max_tokens}: "
            f"{prompt_tokens + max_tokens} do not fit the model's context window of "
            f"{context_length} tokens; shorten the messages or lower max_tokens",
        )


def _shard_range(req: Load, n_layers: int, path: Path) -> tuple[int, int]:
    """The layers [start, end) a Load asks for (all by default), checked against the model's."""
    start = 0 if req.start_layer is None else req.start_layer
    end = n_layers if req.end_layer is None else req.end_layer
    if not 0 <= start < end <= n_layers:
        raise RequestError(
            "InvalidShard", f"layers [{start}, {end}) are not a range of the {n_layers} layers of {path}"
        )
    return start, end


def _mlx_loaded(
    path: Path,
    config: dict[str, Any],
    n_layers: int,
    shard: tuple[int, int],
    weight_bytes: int,
    started: float,
    weights: str,
    reason: str,
) -> ModelLoaded:
    """The reply to a Load of MLX weights, logged."""
    seconds = time.perf_counter() - started
    start, end = shard
    logger.bind(model=str(path), start=start, end=end).info(
        "loaded {} bytes of weights ({}: {}) in {:.2f} s", weight_bytes, weights, reason, seconds
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
    )


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


class EngineChild:
    """The request loop and the loaded model."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.model: Any = None
        self.tokenizer: Any = None
        # A GGUF loaded in llama.cpp (runner.engine_llamacpp), instead of an MLX model.
        self.llama: Any = None
        # Tokens a sequence may hold (prompt and completion), from the model's config; None: unknown.
        self.context_length: int | None = None
        # The pipeline group this process joined (process-global, for its life).
        self.group: Any = None
        # Set by a request after which this process must not serve again.
        self.exit_after_reply = False
        # Requests read while a generation was checking for Cancel.
        self.queued: deque[Request] = deque()
        self.handlers: dict[type, Callable[[Any], Reply | None]] = {
            Load: self.load,
            Warmup: self.warmup,
            Generate: self.generate,
            Unload: self.unload,
            ConnectGroup: self.connect_group,
            # A Cancel that arrives after its generation ended has nothing to cancel.
            Cancel: lambda _req: None,
        }

    def serve(self) -> None:
        """Serve requests until Exit or until the parent closes the pipe."""
        while True:
            req = self.queued.popleft() if self.queued else self.pipe.read()
            if req is None or isinstance(req, Exit):
                return
            log = logger.bind(request=type(req).__name__)
            try:
                reply = self.handlers[type(req)](req)
            except RequestError as exc:
                log.bind(error_type=exc.error_type).warning(f"request failed: {exc}")
                reply = RequestFailed(error_type=exc.error_type, message=str(exc))
            except Exception as exc:  # any engine error is the caller's answer, not a crash
                log.exception("request failed")
                reply = RequestFailed(error_type=type(exc).__name__, message=str(exc) or repr(exc))
            if reply is not None:
                self.pipe.write(reply)
            if self.exit_after_reply:
                return
            _return_freed_memory()

    def connect_group(self, req: ConnectGroup) -> GroupConnected:
        """Join the ring group; a failed attempt leaves the process unusable, so it then exits."""
        from exojet.runner.ring import GroupConnectError, connect_group
        from exojet.runner.ring_identity import GroupKeys

        if self.group is not None:
            raise RequestError("AlreadyInGroup", "this engine process already joined a group")
        if req.keys and (len(req.keys) != req.world_size or not req.seed):
            raise RequestError(
                "InvalidRequest", f"{len(req.keys)} ring keys for {req.world_size} ranks, or no seed of this rank's"
            )
        keys = GroupKeys(req.group_id, req.rank, req.seed.encode(), req.keys) if req.keys else None
        try:
            self.group, refused = connect_group(req.group_id, req.world_size, req.rank, req.hosts, req.timeout_s, keys)
        except GroupConnectError as exc:
            self.exit_after_reply = True
            raise RequestError("GroupConnectFailed", str(exc)) from exc
        logger.bind(group_id=req.group_id, rank=req.rank).info("joined group of {}", req.world_size)
        return GroupConnected(rank=req.rank, world_size=req.world_size, refused=refused)

    def load(self, req: Load) -> ModelLoaded:
        """Load a model folder lazily and materialise the requested layers."""
        if req.engine == "llamacpp":
            return self._load_llamacpp(req)
        if self.group is not None:
            return self._load_pipelined(req)
        from mlx_lm.utils import load_model, load_tokenizer

        started = time.perf_counter()
        self.unload(Unload())
        path = Path(req.model_path)
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
        weight_bytes = materialise(model, start, end, self._report_layers)
        free = psutil.virtual_memory().available
        weights, reason = choose_weights(model, (start, end) == (0, n_layers), req.weights, free)
        if weights == "dense":
            weight_bytes = to_dense_float32(model)
        self.model, self.tokenizer = model, tokenizer
        self.context_length = _context_length(config)
        return _mlx_loaded(path, config, n_layers, (start, end), weight_bytes, started, weights, reason)

    def _load_llamacpp(self, req: Load) -> ModelLoaded:
        from exojet.runner.engine_llamacpp import LlamaCppModel

        self.unload(Unload())
        path = Path(req.model_path)
        try:
            self.llama = LlamaCppModel(path)
        except Exception as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        loaded: ModelLoaded = self.llama.loaded()
        logger.bind(model=str(path), engine="llamacpp").info(
            "loaded {} bytes of weights in {:.2f} s", loaded.weight_bytes, loaded.load_seconds
        )
        return loaded

    def _load_pipelined(self, req: Load) -> ModelLoaded:
        import json

        from mlx.utils import tree_flatten

        from exojet.runner.pipeline import StallWatchdog, load_shard

        started = time.perf_counter()
        self.unload(Unload())
        path = Path(req.model_path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        n_layers = int(config["num_hidden_layers"])
        start, end = _shard_range(req, n_layers, path)
        # A rank that failed before loading never joins the collectives the
        # others wait in: the watchdog turns that wait into a bounded failure.
        with self._ring_guard(), StallWatchdog(LOAD_STALL_TIMEOUT_S):
            self.model, self.tokenizer = load_shard(path, self.group, start, end, self._report_layers)
        self.context_length = _context_length(config)
        params: dict[str, Any] = {}
        tree_flatten(self.model.parameters(), destination=params)
        weight_bytes = sum(a.nbytes for a in params.values())
        return _mlx_loaded(path, config, n_layers, (start, end), weight_bytes, started, "stored", "a pipeline shard")

    def _report_layers(self, done: int, total: int) -> None:
        self.pipe.write(LayersLoaded(done=done, total=total))

    @contextlib.contextmanager
    def _ring_guard(self) -> Iterator[None]:
        """A ring error (a peer gone) ends this process: its group cannot be rebuilt in it."""
        try:
            yield
        except RuntimeError as exc:
            if "[ring]" not in str(exc):
                raise
            logger.error("pipeline peer lost: {}", exc)
            os._exit(RING_BROKEN_EXIT)

    def warmup(self, _req: Warmup) -> Ok:
        """Generate a few tokens so kernels are compiled before the first request."""
        self.generate(
            Generate(
                messages=[Message(role="user", content="hello")],
                max_tokens=WARMUP_TOKENS,
            ),
            stream=False,
        )
        return Ok()

    def unload(self, _req: Unload) -> Ok:
        """Drop the model and return its memory to the system."""
        if self.llama is not None:
            self.llama.close()
            self.llama = None
        if self.model is not None:
            import mlx.core as mx

            self.model = self.tokenizer = None
            gc.collect()
            mx.clear_cache()
        return Ok()

    def generate(self, req: Generate, stream: bool = True) -> Done:
        """Generate a chat completion, writing Token replies when streaming."""
        arrived = time.perf_counter()
        done = self._generate(req, stream)
        return msgspec.structs.replace(done, seconds=time.perf_counter() - arrived)

    def _generate(self, req: Generate, stream: bool) -> Done:
        if self.model is None and self.llama is None:
            raise RequestError("NotLoaded", "no model is loaded")
        if req.max_tokens < 1:
            raise RequestError("InvalidRequest", f"max_tokens must be at least 1, got {req.max_tokens}")
        if self.llama is not None:
            try:
                llama_prompt: list[int] = self.llama.prompt_tokens(req)
            except Exception as exc:
                raise RequestError("InvalidRequest", f"the model cannot take these messages: {exc}") from exc
            _check_fits(len(llama_prompt), req.max_tokens, self.llama.context_length)
            writer = TokenWriter(self.pipe if stream else None)

            def between_tokens() -> bool:
                """Asked between two tokens: whether to stop, after the first token's hand-off
                (here, so that an answer of one token never waits for it). MLX's loop has
                none: mlx-lm computes the next token while it hands out this one."""
                writer.hand_off()
                return stream and self.pipe.readable() and self._cancelled()

            done: Done = self.llama.generate(req, llama_prompt, writer.write if stream else None, between_tokens)
            writer.flush()
            return done
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from exojet.runner.pipeline import StallWatchdog, pipeline_barrier

        started = time.perf_counter()
        try:
            # A chat template may refuse a role it does not know; mlx a seed it cannot hold.
            prompt = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in req.messages],
                add_generation_prompt=True,
            )
            if req.seed is not None:
                mx.random.seed(req.seed)
        except Exception as exc:
            raise RequestError("InvalidRequest", f"the model cannot take these messages or seed: {exc}") from exc
        _check_fits(len(prompt), req.max_tokens, self.context_length)
        sampler = make_sampler(req.temperature, req.top_p)
        scanner = StopScanner(req.stop)
        writer = TokenWriter(self.pipe if stream else None)
        first_at = None
        finish: Literal["stop", "length", "cancelled"] = "length"
        completion_tokens = 0
        in_group = self.group is not None
        # In a group every rank runs the same steps: no rank may stop on its own (a
        # Cancel is passed to the others through the pipeline's stop sum and every rank
        # stops at the same token), a stalled peer ends the process, and all ranks
        # finish the step generate_step queued ahead before any moves on.
        stage = self.model.model if in_group else None
        if stage is not None:
            stage.stop_asked = False
        watchdog = StallWatchdog(STALL_TIMEOUT_S) if in_group else None
        with self._ring_guard(), watchdog or contextlib.nullcontext():
            for response in stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=req.max_tokens,
                sampler=sampler,
            ):
                if watchdog is not None:
                    watchdog.beat()
                if first_at is None:
                    first_at = time.perf_counter()
                # The eos token ends a generation without being part of it.
                eos = response.finish_reason == "stop"
                completion_tokens = response.generation_tokens - (1 if eos else 0)
                delta, stopped = scanner.feed(response.text)
                writer.write(delta)
                if stopped or eos:
                    finish = "stop"
                    break
                if stream and self.pipe.readable() and self._cancelled():
                    if stage is None:
                        finish = "cancelled"
                        break
                    stage.stop_asked = True
                if stage is not None and stage.stop_agreed():
                    finish = "cancelled"
                    break
            if in_group:
                pipeline_barrier(self.group)
        writer.write(scanner.flush())
        writer.flush()
        ended = time.perf_counter()
        first_at = first_at or ended
        # Decode speed: the tokens after the first, over the time after the first.
        decode_seconds = ended - first_at
        decoded = completion_tokens - 1
        return Done(
            text=scanner.text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            tokens_per_second=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
            time_to_first_token=first_at - started,
        )

    def _cancelled(self) -> bool:
        """Read the waiting request: True for Cancel, else keep it for later."""
        req = self.pipe.read()
        if isinstance(req, Cancel):
            return True
        # The parent closed the pipe: stop generating for nobody, then exit.
        self.queued.append(Exit() if req is None else req)
        return req is None


def _context_length(config: dict[str, Any]) -> int | None:
    """The model's context window, as its config states it (llama-style configs do)."""
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc


_MALLOC_TRIM = _libc_trim()


def _return_freed_memory() -> None:
    """Hand memory freed by the request back to the system: glibc keeps what a huge prompt's
    tokenization used, so a stream of them would grow the process for good."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def main() -> int:
    """Entry point: take over stdin/stdout for the protocol and serve."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logger.remove()
    logger.add(
        sys.stderr,
        format="{time:HH:mm:ss.SSS} {level} engine: {message} {extra}",
        colorize=False,
    )
    logger.bind(pid=os.getpid()).info("engine child started")
    try:
        EngineChild(Pipe(proto_in, proto_out)).serve()
    except BrokenPipeError:
        logger.warning("parent closed the reply pipe; exiting")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
