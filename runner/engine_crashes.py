"""Which engines crashed on which model, so `auto` never leaves a model unserved.

An engine process that dies of a fault (SIGSEGV, SIGILL, ...) while it loads a model,
warms it up or serves its first chat has a broken kernel for that model on this machine,
not a bad request: the next load of the same model (the planner's next attempt) takes another
engine this runner has that runs it, and says why. Crashes later in a model's life
(memory pressure, a kill by hand) are not held against the engine.
"""

from __future__ import annotations

import signal

from exojet.runner.engine_choice import EngineName
from exojet.runner.engine_protocol import EXIT_CODES

# Signals of a broken kernel (a bad memory access, an illegal instruction, an abort), as
# opposed to SIGKILL (the OOM killer, a person) or SIGTERM, which say nothing of the engine.
_FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})


def is_engine_fault(returncode: int | None) -> bool:
    """Whether a child that exited with `returncode` died of its engine's own fault."""
    return returncode is not None and returncode < 0 and -returncode in _FAULTS


class CrashMemory:
    """The engines that crashed early on each model path, with what they died of."""

    def __init__(self) -> None:
        self._crashed: dict[str, dict[EngineName, str]] = {}

    def record(self, model_path: str, engine: EngineName, point: str, how: str) -> None:
        """Remember that `engine` crashed on `model_path` at `point` ("load", "warmup", ...)."""
        # The exit's own words, without the stderr lines EngineCrashed quotes after them.
        cause = how.split("; last stderr lines")[0].strip() or "crashed"
        self._crashed.setdefault(model_path, {})[engine] = f"{cause} during {point}"

    def usable(self, model_path: str, installed: list[EngineName]) -> list[EngineName]:
        """The installed engines to try for `model_path`: those that never crashed on it, or
        all of them again when every one did (a crash may have been the machine's)."""
        crashed = self._crashed.get(model_path, {})
        return [e for e in installed if e not in crashed] or list(installed)

    def reason(self, model_path: str, chosen: EngineName) -> str:
        """Why `chosen` serves `model_path`, when another engine crashed on it ("" if none did)."""
        crashed = {e: how for e, how in self._crashed.get(model_path, {}).items() if e != chosen}
        if not crashed:
            return ""
        why = "; ".join(f"{engine} crashed on this model ({how})" for engine, how in crashed.items())
        return f"{why}: serving it on {chosen}"


def exit_message(code: int | None, stopping: bool, stderr: list[str], engine: EngineName | None) -> str:
    """What an engine child's exit means, from its code (a signal, one of EXIT_CODES) and its
    last stderr lines, naming the engine it ran."""
    process = f"{engine} engine process" if engine else "engine process"
    if stopping:
        return f"{process} was stopped (exit code {code})"
    if code in EXIT_CODES:
        return f"{EXIT_CODES[code]}: {process} exited with code {code}"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{process} was killed by {name}"
    if any(line.startswith("Timeout (") for line in stderr):
        # StallWatchdog's exit (faulthandler's, status 1): a ring peer stopped answering.
        return f"pipeline peer stalled: {process} exited with code {code}"
    return f"{process} exited with code {code}"
