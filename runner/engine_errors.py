"""How an engine request fails, seen from the runner: the engine said no, or its process is gone."""

from __future__ import annotations


class EngineError(Exception):
    """The engine answered a request with an error; it is still serving."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class EngineCrashed(Exception):
    """The engine process is gone (killed, crashed or exited); `start()` again."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        # The child's exit status (negative: the signal that killed it); None: not known.
        self.returncode = returncode
