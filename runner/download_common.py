"""What the parts of a model download share: its public types, its errors and its
byte counters (written by the worker threads, read by the event loop)."""

from __future__ import annotations

import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ErrorType = Literal["InvalidModelId", "ModelNotFound", "Unauthorized", "DownloadFailed", "Offline"]


@dataclass(frozen=True)
class DownloadStatus:
    """Progress of one model download, in bytes and files, counting resumed bytes."""

    model_id: str
    downloaded_bytes: int
    total_bytes: int
    completed_files: int
    total_files: int


ProgressCallback = Callable[[DownloadStatus], Awaitable[None] | None]


class DownloadError(Exception):
    """A download that failed for a reason a person can act on.

    `error_type` is one of "InvalidModelId", "ModelNotFound", "Unauthorized",
    "DownloadFailed" (transient errors outlasted the retries) or "Offline".
    """

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type: ErrorType = error_type
        self.message = message

    def __reduce__(self) -> tuple[type[DownloadError], tuple[ErrorType, str]]:
        # Keeps both fields when the error crosses a process boundary.
        return (DownloadError, (self.error_type, self.message))


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient errors.

    `max_attempts` counts consecutive failures that made no progress, so a long
    download over a flaky link keeps going while a dead endpoint gives up after
    about `sum(delays)` seconds (0.2 + 0.4 + ... capped at 5 s: ~16 s by default).
    """

    base_delay: float = 0.2
    max_delay: float = 5.0
    max_attempts: int = 8

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row, jittered so runners spread out."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


class TransientError(Exception):
    """A failure worth retrying (server error, dropped connection, bad checksum)."""


class DownloadCancelled(Exception):
    """The asyncio caller went away; the worker threads stop at the next chunk."""


class Counters:
    """Bytes on disk and expected sizes per file, and the files done; thread-safe."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._done: set[str] = set()

    def status(self) -> DownloadStatus:
        """A consistent snapshot (called from the event loop)."""
        with self._lock:
            return DownloadStatus(
                self.model_id,
                sum(self._bytes.values()),
                sum(self._sizes.values()),
                len(self._done),
                len(self._sizes),
            )

    def expect(self, name: str, size: int, on_disk: int, done: bool) -> None:
        """A file of the model: its size, the bytes already on disk (resumed), whether it is complete."""
        with self._lock:
            self._sizes[name] = size
            self._bytes[name] = on_disk
            if done:
                self._done.add(name)

    def set_from_folder(self, folder: Path) -> None:
        """Every file of a complete `folder`, done."""
        for p in folder.rglob("*"):
            if p.is_file():
                size = p.stat().st_size
                self.expect(p.relative_to(folder).as_posix(), size, size, True)

    def on_disk(self, name: str) -> int:
        with self._lock:
            return self._bytes[name]

    def set_bytes(self, name: str, value: int) -> None:
        with self._lock:
            self._bytes[name] = value

    def add_bytes(self, name: str, count: int) -> None:
        with self._lock:
            self._bytes[name] += count

    def set_size(self, name: str, size: int) -> None:
        with self._lock:
            self._sizes[name] = size

    def done(self, name: str) -> None:
        with self._lock:
            self._done.add(name)
