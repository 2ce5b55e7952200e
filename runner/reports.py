"""What a runner writes on its own subject, as typed events: its statuses, its
tasks' statuses, download and load progress. Every write is fenced (`EventWriter`); the
task statuses it writes also go into the runner's `TaskHistory`.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from exojet.bus.events import DownloadProgress, LoadProgress, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.statuses import RunnerStatus, TaskStatus
from exojet.runner.download import DownloadStatus
from exojet.runner.event_writer import EventWriter
from exojet.runner.task_history import TaskHistory


class Reports:
    """One runner's writes; `writer` is replaced by each new incarnation."""

    def __init__(self, runner_id: str, history: TaskHistory) -> None:
        self.runner_id = runner_id
        self.history = history
        self.writer: EventWriter | None = None
        self.log = logger.bind(runner_id=runner_id)

    @property
    def incarnation(self) -> int:
        return self.writer.incarnation if self.writer else 0

    def _writer(self) -> EventWriter:
        assert self.writer is not None, "a runner writes only once registered"
        return self.writer

    async def runner_status(self, status: RunnerStatus) -> int:
        """Write `RunnerStatusUpdated`; only `runner/transitions.py` calls it."""
        return await self._writer().write(
            lambda eid, inc, at: RunnerStatusUpdated(
                event_id=eid, runner_id=self.runner_id, incarnation=inc, at=at, runner_status=status
            )
        )

    async def task_status(
        self,
        task_id: str,
        status: TaskStatus,
        kind: str | None,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Write `TaskStatusUpdated` and record it in the task history."""
        seq = await self._writer().write(
            lambda eid, inc, at: TaskStatusUpdated(
                event_id=eid,
                runner_id=self.runner_id,
                incarnation=inc,
                at=at,
                task_id=task_id,
                task_status=status,
                task_type=kind,
                error_type=error_type,
                error_message=error_message,
                result=result,
            )
        )
        self.history.record(task_id, status, kind)
        log = self.log.bind(task_id=task_id, seq=seq)
        if error_type:
            log.warning(f"task {status}: {error_type}: {error_message}")
        else:
            log.info(f"task {status}")

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
