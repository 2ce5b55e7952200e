"""The one interface every engine in the engine child implements, and how a Load picks one.

An engine class is constructed by a `Load` (it loads the model or raises `RequestError`),
says what it loaded (`loaded`), generates (`generate`: text deltas and tool-call pieces to `emit`, `cancelled`
asked between tokens) and frees the model (`close`). The child's request loop
(`runner.engine_child`) only ever talks to this interface: adding an engine is a class
and a line in `_ENGINES`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

from exojet.bus.capabilities import Capabilities
from exojet.bus.sampling import choices
from exojet.bus.tools import ToolCallDelta, wanted_tools
from exojet.runner.engine_protocol import Done, Generate, Load, ModelLoaded, Token

# Where an engine sends what it generates: text deltas (a Token when they carry their choice of
# `n` or their tokens' log-probabilities), and pieces of tool calls.
Emit = Callable[[str | ToolCallDelta | Token], None]

# A fault hook for the tests of engine crashes: "<engine>:<point>" (point: load, warmup or
# generate) makes the child kill itself with SIGSEGV there, as a broken kernel would.
FAULT_ENV = "EXO_ENGINE_FAULT"


class RequestError(Exception):
    """A request that cannot be served, with the error type the parent will see."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class EngineBackend(Protocol):
    """A loaded model on one engine."""

    engine: str
    # Generations it serves at once, each `generate` called from a thread of its own
    # (1: one at a time, on the child's main thread).
    capacity: int
    # What it can do beyond a plain chat (bus/capabilities.py): stated in `loaded()`, and the
    # child refuses a chat that needs more before the engine sees it.
    capabilities: Capabilities

    @property
    def context_length(self) -> int | None:
        """Tokens a sequence may hold (prompt and completion); None: unknown."""

    def loaded(self) -> ModelLoaded: ...

    def generate(self, req: Generate, emit: Emit | None, cancelled: Callable[[], bool]) -> Done: ...

    def close(self) -> None: ...


def check_fits(prompt_tokens: int, max_tokens: int, context_length: int | None) -> None:
    """Refuse, before any work, a chat that cannot fit the context window (None: unknown)."""
    if context_length and prompt_tokens + max_tokens > context_length:
        raise RequestError(
            "ContextLengthExceeded",
            f"the prompt is {prompt_tokens} tokens and max_tokens {max_tokens}: "
            f"{prompt_tokens + max_tokens} do not fit the model's context window of "
            f"{context_length} tokens; shorten the messages or lower max_tokens",
        )


def check_choices(req: Generate, capacity: int) -> None:
    """Refuse `n` answers beyond the engine's sequences at once (rather than wait for ever), or
    beside tools (their calls would need a choice index the tool-call chunks do not carry)."""
    if (n := choices(req.sampling)) > capacity:
        raise RequestError("InvalidRequest", f"n={n} answers do not fit this engine's {capacity} slots")
    if n > 1 and wanted_tools(req.tools, req.tool_choice):
        raise RequestError("InvalidRequest", "n > 1 with tools is not supported: ask for one answer")


def refuse_logprobs_beside_calls(req: Generate, calls_in_text: bool, engine: str) -> None:
    """Refuse logprobs where a tool call is read out of the answer's text (the generic path's JSON,
    or a template's syntax cut from the words): the tokens would not join to the content."""
    if req.sampling.reported_top is not None and calls_in_text:
        raise RequestError(
            "InvalidRequest", f"{engine} reports no logprobs beside tools it may call (tool_choice none: it does)"
        )


def raw_prompt(req: Generate) -> str:
    """A raw request's prompt: its one message's content, given to the model as is."""
    if len(req.messages) != 1:
        raise RequestError("InvalidRequest", f"a raw prompt is one message, got {len(req.messages)}")
    return req.messages[0].content


def fault_point(engine: str, point: str) -> None:
    """Crash here if the fault hook names this engine and point (tests only set it)."""
    if os.environ.get(FAULT_ENV) == f"{engine}:{point}":
        os.kill(os.getpid(), signal.SIGSEGV)


def open_engine(req: Load, group: Any, on_layer: Callable[[int, int], None]) -> EngineBackend:
    """Load `req`'s model on the engine it names; `group` is the pipeline group this process
    joined (MLX only), `on_layer(done, total)` is called as layers come into memory."""
    opener = _ENGINES.get(req.engine)
    if opener is None:
        raise RequestError("NoEngineForModel", f"this engine process has no engine {req.engine!r}")
    fault_point(req.engine, "load")
    return opener(req, group, on_layer)


def _open_mlx(req: Load, group: Any, on_layer: Callable[[int, int], None]) -> EngineBackend:
    from exojet.runner.engine_mlx import MlxEngine

    return MlxEngine(req, group, on_layer)


def _open_llamacpp(req: Load, group: Any, _on_layer: Callable[[int, int], None]) -> EngineBackend:
    from exojet.runner.engine_llamacpp import LlamaCppEngine

    if group is not None:
        raise RequestError("NoEngineForModel", "llama.cpp cannot run a pipeline shard")
    return LlamaCppEngine(req)


_ENGINES: dict[str, Callable[[Load, Any, Callable[[int, int], None]], EngineBackend]] = {
    "mlx": _open_mlx,
    "llamacpp": _open_llamacpp,
}
