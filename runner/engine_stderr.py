"""The engine child's last stderr lines, kept for the report of its crash."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

STDERR_LINES = 40
_MAX_STDERR_LINE = 2000


class StderrTail:
    """Reads a child's stderr to its end, logging each line at debug and keeping the last ones."""

    def __init__(self, log: Any, lines: int = STDERR_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self.log = log

    async def read(self, stream: asyncio.StreamReader) -> None:
        partial = b""
        while chunk := await stream.read(65536):
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                self._keep(line)
            partial = partial[-_MAX_STDERR_LINE:]
        if partial:
            self._keep(partial)

    def _keep(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()[:_MAX_STDERR_LINE]
        self.lines.append(line)
        self.log.debug("engine stderr: {}", line)

    def quoted(self) -> str:
        """The kept lines as a crash report quotes them ("" when there are none)."""
        if not self.lines:
            return ""
        return "; last stderr lines:\n" + "\n".join(self.lines)
