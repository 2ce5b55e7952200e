"""The engine child process of the runner: `python -m exojet.runner.engine_child`.

It runs the engine each Load names (`runner.engine_backend`: MLX or llama.cpp), and
serves the requests of `runner.engine_protocol` on its stdin and stdout: one at a time,
but for the generations of an engine that serves several at once, each of which runs in
a thread of its own while this loop reads on (their Cancels above all). Stdout is kept
for the protocol only: the original descriptors are duplicated for the protocol and fd
0/1 are pointed at /dev/null and stderr, so a stray `print` or a C library writing to
stdout cannot corrupt a frame.

Handlers are looked up by request type, so a pipelined deployment can add its own
request (joining a group) and load path without touching the loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger

from exojet.bus.capabilities import missing, needed, words
from exojet.bus.logprobs import TokenLogprob
from exojet.bus.sampling import Sampling
from exojet.bus.tools import ToolCallDelta
from exojet.runner.engine_backend import EngineBackend, RequestError, fault_point, open_engine
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
    ToolCallChunk,
    Unload,
    Warmup,
)

WARMUP_TOKENS = 4


# Text generated faster than this is written to the pipe in one frame: the runner, its NATS
# server, the API and the client share the cores with the engine, and each frame costs them
# about 2 ms of CPU in all, taken from the engine's threads on a 2-core machine: a frame per
# 20 ms cost llama.cpp 6-8% of its speed, one per 50 ms (20 a second, still a smooth stream) 2-3%.
TOKEN_FLUSH_S = 0.05
# Frames a second of all generations together: with many at once each stream's frames come
# further apart (8 streams: 5 a second, each of ~3 tokens), so the frames' cost stays that of
# two streams however many run (at 8 streams a frame per token cost llama.cpp 10% of its speed).
MAX_FRAMES_PER_S = 40


def flush_interval(generations: int) -> float:
    """The least time between two frames of one stream while `generations` run at once."""
    return max(TOKEN_FLUSH_S, generations / MAX_FRAMES_PER_S)


class TokenWriter:
    """Streams a generation's text to the parent: the first piece at once, then at most one
    frame every `interval()` seconds (a piece waits at most until the next token or the end);
    the text of each answer of `n`, and its tokens' log-probabilities, go in frames of their own."""

    def __init__(
        self, pipe: Pipe | None, request_id: int = 0, interval: Callable[[], float] = lambda: TOKEN_FLUSH_S
    ) -> None:
        self.pipe = pipe
        self.request_id = request_id
        self.interval = interval
        # Per choice: the text and the log-probabilities held.
        self.held: dict[int, tuple[list[str], list[TokenLogprob]]] = {}
        self.written_at: float | None = None

    def write(self, piece: str | ToolCallDelta | Token) -> None:
        if self.pipe is None or not piece:
            return
        if isinstance(piece, ToolCallDelta):
            # After the text before it, at once: a call is rare and the client waits on it.
            self.flush()
            self.pipe.write(ToolCallChunk(delta=piece, request_id=self.request_id))
            return
        token = piece if isinstance(piece, Token) else Token(text=piece)
        texts, logprobs = self.held.setdefault(token.choice, ([], []))
        texts.append(token.text)
        logprobs.extend(token.logprobs)
        if self.written_at is None or time.perf_counter() - self.written_at >= self.interval():
            self.flush()

    def flush(self) -> None:
        if self.pipe is None or not self.held:
            return
        for choice, (texts, logprobs) in sorted(self.held.items()):
            self.pipe.write(
                Token(text="".join(texts), request_id=self.request_id, choice=choice, logprobs=tuple(logprobs))
            )
        self.held.clear()
        self.written_at = time.perf_counter()


class EngineChild:
    """The request loop and the loaded model (one engine of `runner.engine_backend`)."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.engine: EngineBackend | None = None
        # The pipeline group this process joined (process-global, for its life).
        self.group: Any = None
        # Set by a request after which this process must not serve again.
        self.exit_after_reply = False
        # Requests read while a generation was checking for Cancel.
        self.queued: deque[Request] = deque()
        # Generations served since the model was loaded (the warmup's is the first).
        self.served = 0
        # Generations running in threads: their threads and cancel flags, by request id.
        self.threads: dict[int, tuple[threading.Thread, threading.Event]] = {}
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
        try:
            while True:
                req = self.queued.popleft() if self.queued else self.pipe.read()
                if req is None or isinstance(req, Exit):
                    return
                if isinstance(req, Cancel) and self.threads:
                    self._cancel_threads(req.request_id)
                    continue
                if isinstance(req, Generate) and self.engine is not None and self.engine.capacity > 1:
                    self._start_thread(req)
                    continue
                # Nothing else runs beside generations (the parent waits for them to end).
                self._join_threads()
                self.answer(req, functools.partial(self.handlers[type(req)], req))
                if self.exit_after_reply:
                    return
                _return_freed_memory()
        finally:
            self._cancel_threads(None)
            self._join_threads()

    def answer(self, req: Request, serve: Callable[[], Reply | None]) -> None:
        """Serve one request and write its terminal reply (an error is the caller's answer)."""
        log = logger.bind(request=type(req).__name__)
        request_id = req.request_id if isinstance(req, Generate) else 0
        try:
            reply = serve()
        except RequestError as exc:
            log.bind(error_type=exc.error_type).warning(f"request failed: {exc}")
            reply = RequestFailed(error_type=exc.error_type, message=str(exc), request_id=request_id)
        except Exception as exc:  # any engine error is the caller's answer, not a crash
            log.exception("request failed")
            reply = RequestFailed(error_type=type(exc).__name__, message=str(exc) or repr(exc), request_id=request_id)
        if reply is not None:
            self.pipe.write(reply)

    def _start_thread(self, req: Generate) -> None:
        cancel = threading.Event()

        def run() -> None:
            try:
                self.answer(req, lambda: self.generate(req, cancel.is_set))
            finally:
                self.threads.pop(req.request_id, None)

        thread = threading.Thread(target=run, name=f"generate-{req.request_id}", daemon=True)
        self.threads[req.request_id] = (thread, cancel)
        thread.start()

    def _cancel_threads(self, request_id: int | None) -> None:
        for rid, (_, cancel) in list(self.threads.items()):
            if request_id in (None, rid):
                cancel.set()

    def _join_threads(self) -> None:
        for thread, _ in list(self.threads.values()):
            thread.join()

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
        """Load a model on the engine the request names (the previous one is dropped first)."""
        self.unload(Unload())
        self.engine = open_engine(req, self.group, self._report_layers)
        self.served = 0
        loaded = self.engine.loaded()
        logger.bind(model=req.model_path, engine=loaded.engine).info(
            "loaded {} bytes of weights in {:.2f} s", loaded.weight_bytes, loaded.load_seconds
        )
        return loaded

    def _report_layers(self, done: int, total: int) -> None:
        self.pipe.write(LayersLoaded(done=done, total=total))

    def warmup(self, _req: Warmup) -> Ok:
        """Generate a few tokens so kernels are compiled before the first request."""
        hello = Generate(messages=[Message(role="user", content="hello")], sampling=Sampling(max_tokens=WARMUP_TOKENS))
        self._generate(hello, False)
        return Ok()

    def unload(self, _req: Unload) -> Ok:
        """Drop the model and return its memory to the system."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            # Before the reply, so that the memory is back when the parent hears Ok (llama.cpp's
            # buffers are malloc'd: glibc keeps them until trimmed).
            _return_freed_memory()
        return Ok()

    def generate(self, req: Generate, cancelled: Callable[[], bool] | None = None) -> Done:
        """Generate a chat completion, writing Token replies as it goes; `cancelled` says when
        to stop (by default a Cancel read from the pipe between two tokens)."""
        arrived = time.perf_counter()
        done = self._generate(req, True, cancelled)
        return msgspec.structs.replace(done, seconds=time.perf_counter() - arrived, request_id=req.request_id)

    def _generate(self, req: Generate, stream: bool, cancelled: Callable[[], bool] | None = None) -> Done:
        if self.engine is None:
            raise RequestError("NotLoaded", "no model is loaded")
        if lacking := missing(needed(req, req.sampling), self.engine.capabilities):
            # Refused, not ignored: an answer that skipped its constraint would look like one.
            raise RequestError("InvalidRequest", f"{self.engine.engine} cannot do {words(lacking)} with this model")
        fault_point(self.engine.engine, "warmup" if not stream else "generate")
        self.served += 1
        writer = TokenWriter(self.pipe if stream else None, req.request_id, lambda: flush_interval(len(self.threads)))

        def cancel_read() -> bool:
            return stream and self.pipe.readable() and self._cancelled(req.request_id)

        done = self.engine.generate(req, writer.write if stream else None, cancelled or cancel_read)
        writer.flush()
        return done

    def _cancelled(self, request_id: int) -> bool:
        """Read the waiting request: True for a Cancel of this generation (or of all), else
        keep it for later (a Cancel of another, ended generation is dropped)."""
        req = self.pipe.read()
        if isinstance(req, Cancel):
            return req.request_id in (None, request_id)
        # The parent closed the pipe: stop generating for nobody, then exit.
        self.queued.append(Exit() if req is None else req)
        return req is None


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
