"""The progress a runner writes on its own subject while a task works, as typed events:
download and load progress. Every write is fenced (`EventWriter`); its statuses and its
tasks' are `runner/handling.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from exojet.bus.events import DownloadProgress, LoadProgress
from exojet.runner.download import DownloadStatus
from exojet.runner.event_writer import EventWriter


class Reports:
    """One runner's progress reports, written through the current incarnation's writer."""

    def __init__(self, runner_id: str, writer: Callable[[], EventWriter]) -> None:
        self.runner_id = runner_id
        self._writer = writer

    async def progress(self, status: DownloadStatus) -> None:
        """Write `DownloadProgress` (the download throttles how often)."""
        await self._writer().write(
            lambda eid, inc, at: DownloadProgress(
                event_id=eid,
                runner_id=self.runner_id,
                incarnation=inc,
                at=at,
                model_id=status.model_id,
                downloaded_bytes=status.downloaded_bytes,
                total_bytes=status.total_bytes,
                completed_files=status.completed_files,
                total_files=status.total_files,
            )
        )

    async def load_progress(self, task_id: str, model_id: str, loaded: int, total: int) -> None:
        """Write `LoadProgress` (the executor throttles how often)."""
        await self._writer().write(
            lambda eid, inc, at: LoadProgress(
                event_id=eid,
                runner_id=self.runner_id,
                incarnation=inc,
                at=at,
                model_id=model_id,
                task_id=task_id,
                layers_loaded=loaded,
                layers_total=total,
            )
        )
