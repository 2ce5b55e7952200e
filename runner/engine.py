"""The runner's side of the engine: a child process driven over a pipe.

Each load picks the engine for its model (`runner.engine_choice`: MLX for an mlx-lm
folder, llama.cpp for a GGUF); both run in the same child. The child gets the
fastest BLAS this machine has through its environment (`runner.mlx_cpu`).

Engine work (loading, generating) blocks and can crash the process it runs in, so it
runs in `runner.engine_child`. The runner's event loop stays free to heartbeat,
and a killed, out-of-memory or segfaulted engine becomes an `EngineCrashed`
exception naming the signal and quoting the child's last stderr lines; `start()`
then gives a fresh child.

One reader task owns the child's stdout and turns frames into replies, so a caller
cancelled while waiting never leaves half a frame behind: a generation's go to its own
queue (by request id), the rest to one queue. Generations run side by side, up to the
loaded model's `chat_capacity` (the caller keeps to it); any other request waits until
none runs, and is serialised; a request abandoned before its terminal reply (a cancelled
load, a generation the consumer stopped reading) is drained before the next one is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
from loguru import logger

from exojet.bus.ops import parent_death
from exojet.runner.engine_choice import (
    EngineName,
    EngineWanted,
    NoEngineForModel,
    choose_engine,
    installed_engines,
)
from exojet.runner.engine_crashes import CrashMemory, exit_message, is_engine_fault
from exojet.runner.engine_errors import EngineCrashed, EngineError
from exojet.runner.engine_generations import Generations
from exojet.runner.engine_protocol import (
    HEADER,
    TERMINAL_REPLIES,
    Cancel,
    ConnectGroup,
    Done,
    Exit,
    Generate,
    GroupConnected,
    LayersLoaded,
    Load,
    ModelLoaded,
    Ok,
    Reply,
    Request,
    RequestFailed,
    Token,
    ToolCallChunk,
    Unload,
    Warmup,
    WeightsChoice,
    encode_frame,
    frame_length,
    reply_decoder,
)
from exojet.runner.engine_stderr import STDERR_LINES, StderrTail
from exojet.runner.mlx_cpu import child_env, describe, find_blas

_R = TypeVar("_R", ModelLoaded, GroupConnected, Ok)

# Dropping a model takes well under a second; a child that has not after this long is stuck
# (llama.cpp's server once waited forever in its destructor for its loop thread to end).
UNLOAD_TIMEOUT_S = 30.0


class Engine:
    """An engine (MLX or llama.cpp, chosen per model) in a child process, driven from asyncio.

    Usage: `await start()`, `await load(path)`, `await warmup()`, then
    `async for chunk in generate(req)`; `await stop()` at the end. `wanted`
    narrows the engines a load may pick (`exojet runner --engine`).
    """

    def __init__(
        self, wanted: EngineWanted = "auto", stderr_lines: int = STDERR_LINES, unload_timeout: float = UNLOAD_TIMEOUT_S
    ) -> None:
        self.wanted: EngineWanted = wanted
        self.unload_timeout = unload_timeout
        # The engines this runner has, fastest first, for its registration.
        self.engines: list[EngineName] = [e for e in installed_engines() if wanted in ("auto", e)]
        self._in_group = False
        self._proc: asyncio.subprocess.Process | None = None
        self._replies: asyncio.Queue[Reply | EngineCrashed] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None
        self._stderr_lines = stderr_lines
        self._stderr = StderrTail(logger, stderr_lines)
        self._lock = asyncio.Lock()
        self._crash: EngineCrashed | None = None
        # Terminal replies the child still owes for abandoned requests (not generations).
        self._owed = 0
        # Each generation under way (the child tags each reply of one with its number).
        self._gens = Generations()
        self._stopping = False
        self._log = logger.bind(component="engine")
        # The model and engine loaded, and whether it has served a chat yet: a crash
        # before its first chat is held against the engine for that model.
        self._loaded: tuple[str, EngineName] | None = None
        self._chats_served = 0
        # The engine the child runs (named in a crash report); None before a load.
        self._engine_in_use: EngineName | None = None
        self.crashes = CrashMemory()
        self.blas = find_blas()
        # The CPU path every child of this engine gets, for the runner's registration.
        self.setup = describe(self.blas)

    @property
    def pid(self) -> int | None:
        """The child's process id, or None before `start()`."""
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        """Whether the child is running and has not been found dead."""
        return self._proc is not None and self._proc.returncode is None and self._crash is None

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the child wrote to stderr."""
        return list(self._stderr.lines)

    async def start(self) -> None:
        """Spawn a fresh child (after a crash or a stop too); no-op if one is alive."""
        if self.alive:
            return
        await self._reap()
        self._replies = asyncio.Queue()
        self._crash = None
        self._owed = 0
        self._gens.end_all(None)
        self._stopping = False
        self._in_group = False
        self._engine_in_use = None
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exojet.runner.engine_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # The runner decides when its engine dies: a Ctrl-C on the terminal
            # reaches the runner, which then stops the engine in order; and if the
            # runner dies (even by SIGKILL) mid-computation, the engine dies with it.
            start_new_session=True,
            env=child_env(self.blas),
            preexec_fn=parent_death.preexec(signal.SIGKILL),
        )
        self._log = logger.bind(component="engine", engine_pid=self._proc.pid)
        self._stderr = StderrTail(self._log, self._stderr_lines)
        assert self._proc.stderr is not None
        self._stderr_reader = asyncio.create_task(self._stderr.read(self._proc.stderr))
        self._reader = asyncio.create_task(self._read_replies(self._proc))
        self._log.info("engine process started; BLAS {} ({})", self.blas.library or "MLX's own", self.blas.reason)

    async def load(
        self,
        model_path: str,
        start_layer: int | None = None,
        end_layer: int | None = None,
        weights: WeightsChoice = "auto",
        on_layers: Callable[[LayersLoaded], Awaitable[None]] | None = None,
    ) -> ModelLoaded:
        """Load a model (layers [start_layer, end_layer) or all of them) on the engine
        `runner.engine_choice` picks for it (EngineError NoEngineForModel if none can).
        `on_layers` is awaited with each `LayersLoaded` the engine reports on the way."""
        pipelined = self._in_group or start_layer is not None or end_layer is not None
        engines = self.crashes.usable(model_path, [e for e in installed_engines() if e in self.engines])
        try:
            engine, target = choose_engine(Path(model_path), self.wanted, engines, pipelined)
        except NoEngineForModel as exc:
            raise EngineError("NoEngineForModel", str(exc)) from exc
        if self._engine_in_use is not None and not self._in_group:
            # Dropped first, within its bound; a child in a group cannot be replaced (its own
            # load drops the model before loading), and a stuck one ends at the task's deadline.
            await self.unload()
        self._loaded, self._chats_served = None, 0
        self._engine_in_use = engine
        with self._blaming(model_path, engine, "load"):
            loaded = await self._call(
                Load(
                    model_path=str(target), start_layer=start_layer, end_layer=end_layer, weights=weights, engine=engine
                ),
                ModelLoaded,
                on_layers,
            )
        self._loaded = (model_path, engine)
        loaded = msgspec.structs.replace(loaded, engine_reason=self.crashes.reason(model_path, engine))
        self._log.bind(engine_reason=loaded.engine_reason).info(
            "loaded {} on {}: weights {} ({})", target, engine, loaded.weights, loaded.weights_reason
        )
        return loaded

    @contextlib.contextmanager
    def _blaming(self, model_path: str, engine: EngineName, point: str) -> Iterator[None]:
        """A crash inside is remembered against `engine` for the model (runner.engine_crashes)."""
        try:
            yield
        except EngineCrashed as exc:
            if not self._stopping and is_engine_fault(exc.returncode):
                self.crashes.record(model_path, engine, point, str(exc))
                self._log.bind(engine=engine, model=model_path).error("engine {} crashed during {}", engine, point)
            raise

    def _early(self, point: str) -> contextlib.AbstractContextManager[None]:
        """Blame a crash at `point` on the loaded engine, while the model has served no chat."""
        if self._loaded is None or self._chats_served:
            return contextlib.nullcontext()
        return self._blaming(*self._loaded, point)

    async def connect_group(
        self,
        group_id: str,
        world_size: int,
        rank: int,
        hosts: list[str],
        timeout_s: float,
        seed: bytes = b"",
        keys: list[str] | None = None,
    ) -> GroupConnected:
        """Join a pipeline group (the child can join one group in its life); with `keys`
        (every rank's ring key) each neighbour proves its rank, and this rank with `seed`."""
        connected = await self._call(
            ConnectGroup(
                group_id=group_id,
                world_size=world_size,
                rank=rank,
                hosts=hosts,
                timeout_s=timeout_s,
                seed=seed.decode(),
                keys=keys or [],
            ),
            GroupConnected,
        )
        self._in_group = True
        return connected

    async def warmup(self) -> None:
        """Run a short generation so the first request does not pay for compilation."""
        with self._early("warmup"):
            await self._call(Warmup(), Ok)

    async def unload(self) -> None:
        """Drop the loaded model and free its memory. A child that has not done so within
        `unload_timeout` s is replaced by a fresh one, which holds nothing."""
        try:
            await self._call(Unload(), Ok, bound=self.unload_timeout)
        except TimeoutError:
            self._log.warning("engine did not unload in {} s; starting a fresh engine process", self.unload_timeout)
            await self.stop(timeout=1.0)
            await self.start()
        self._loaded, self._engine_in_use = None, None

    def next_request_id(self) -> int:
        """A number for a generation (`Generate.request_id`), to `cancel` it by."""
        return self._gens.next_request_id()

    async def generate(self, req: Generate) -> AsyncIterator[Token | ToolCallChunk | Done]:
        """Stream a chat completion: `Token` and `ToolCallChunk` deltas as they come, then one `Done`. Several
        may run at once (up to the model's `chat_capacity`); `req.request_id`, if set, came
        from `next_request_id`.

        Stopping the iteration early cancels the generation in the child.
        """
        async with self._lock:
            if self._crash is not None:
                raise self._crash
            request_id = req.request_id or self.next_request_id()
            replies = self._gens.open(request_id)
            early = self._early("first chat")
            self._chats_served += 1
            await self._write(msgspec.structs.replace(req, request_id=request_id))
        finished = False
        try:
            with early:
                while True:
                    reply = await replies.get()
                    if isinstance(reply, Exception):
                        raise reply
                    if isinstance(reply, Token | ToolCallChunk):
                        yield reply
                        continue
                    finished = True
                    if isinstance(reply, Done):
                        yield reply
                        return
                    raise self._unexpected(reply)
        finally:
            abandoned = not finished and self.alive
            self._gens.close(request_id, abandoned)
            if abandoned:
                # No await here: this may run while the generator is being closed.
                self._stdin().write(encode_frame(Cancel(request_id=request_id)))

    async def settle(self, timeout: float) -> bool:
        """Wait, at most `timeout` s, for the replies the child owes for abandoned requests
        (a generation cut short answers its Cancel between two tokens); False if it gives
        them no sooner, or is gone: then only a fresh child serves again."""
        try:
            async with asyncio.timeout(timeout):
                await self._gens.none_abandoned.wait()
                async with self._lock:
                    while self._owed:
                        await self._next_reply()
        except (TimeoutError, EngineCrashed):
            return False
        return self.alive

    def cancel(self, request_id: int | None = None) -> None:
        """Ask generation `request_id` (None: every one under way) to stop: `generate` then
        yields its `Done` (finish_reason "cancelled") within a token; in a group, every rank
        stops at the same token."""
        if self.alive:
            self._stdin().write(encode_frame(Cancel(request_id=request_id)))

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit; terminate, then kill it if it does not in time."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.returncode is None:
            try:
                # Cancel first so a running generation ends instead of finishing.
                stdin = self._stdin()
                stdin.write(encode_frame(Cancel()) + encode_frame(Exit()))
                await stdin.drain()
            except ConnectionError:
                pass
            for escalate in (proc.terminate, proc.kill):
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                    break
                except TimeoutError:
                    self._log.warning("engine did not exit in {} s; {}", timeout, escalate.__name__)
                    # It may have exited in the meantime; then there is nothing to signal.
                    with contextlib.suppress(ProcessLookupError):
                        escalate()
            else:
                await proc.wait()
        await self._reap()
        self._log.info("engine process stopped with code {}", proc.returncode)

    async def _reap(self) -> None:
        """Wait for the reader tasks of a child that has exited."""
        for task in (self._reader, self._stderr_reader):
            if task is not None:
                await task
        self._reader = self._stderr_reader = None

    async def _call(
        self,
        req: Request,
        expected: type[_R],
        on_layers: Callable[[LayersLoaded], Awaitable[None]] | None = None,
        bound: float | None = None,
    ) -> _R:
        """Send a request that has a single terminal reply and return it (a load's
        `LayersLoaded` on the way go to `on_layers`); TimeoutError if the child has not
        answered `bound` s after it was sent."""
        async with self._lock:
            # Nothing but generations runs beside generations (the child joins them first).
            await self._gens.idle.wait()
            async with asyncio.timeout(bound):
                await self._send(req)
                reply = await self._next_reply()
                while isinstance(reply, LayersLoaded):
                    if on_layers is not None:
                        await on_layers(reply)
                    reply = await self._next_reply()
            if isinstance(reply, expected):
                return reply
            raise self._unexpected(reply)

    async def _send(self, req: Request) -> None:
        """Send a request once the replies of abandoned requests are drained."""
        if self._crash is not None:
            raise self._crash
        while self._owed:
            await self._next_reply()
        self._owed += 1
        await self._write(req)

    async def _write(self, req: Request) -> None:
        stdin = self._stdin()
        stdin.write(encode_frame(req))
        try:
            await stdin.drain()
        except ConnectionError:
            # The child is gone; the reader reports how, with its stderr.
            pass

    def _stdin(self) -> asyncio.StreamWriter:
        if self._proc is None or self._proc.stdin is None:
            raise EngineCrashed("engine process is not running; call start() first")
        return self._proc.stdin

    async def _next_reply(self) -> Reply:
        item = await self._replies.get()
        if isinstance(item, EngineCrashed):
            self._crash = item
            raise item
        if isinstance(item, TERMINAL_REPLIES):
            self._owed -= 1
        return item

    def _unexpected(self, reply: Reply) -> Exception:
        if isinstance(reply, RequestFailed):
            return EngineError(reply.error_type, reply.message)
        return EngineError("ProtocolError", f"unexpected engine reply {type(reply).__name__}")

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        """Turn the child's stdout into replies; at its end, report the crash."""
        assert proc.stdout is not None
        detail = ""
        try:
            while True:
                header = await proc.stdout.readexactly(HEADER.size)
                body = await proc.stdout.readexactly(frame_length(header))
                reply = reply_decoder.decode(body)
                # A generation's reply to its queue, the rest in order to `_replies`.
                if not self._gens.dispatch(reply):
                    self._replies.put_nowait(reply)
        except asyncio.IncompleteReadError:
            pass
        except Exception as exc:  # noqa: BLE001 - a corrupt stream ends this child
            detail = f" after a corrupt reply ({exc})"
            proc.kill()
        await proc.wait()
        if self._stderr_reader is not None:
            await self._stderr_reader
        crashed = EngineCrashed(
            exit_message(proc.returncode, self._stopping, list(self._stderr.lines), self._engine_in_use)
            + detail
            + self._stderr.quoted(),
            proc.returncode,
        )
        self._crash = crashed
        self._replies.put_nowait(crashed)
        # A dead child owes nothing.
        self._gens.end_all(crashed)
