"""What a runner writes on its own subject, as typed events: its statuses, its
tasks' statuses, download and load progress. Every write is fenced (`EventWriter`); the
task statuses it writes also go into the runner's `TaskHistory`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from loguru import logger

from exojet.bus.events import DownloadProgress, LoadProgress, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.statuses import RunnerStatus, TaskStatus
from exojet.runner.download import DownloadStatus
from exojet.runner.event_writer import Build, EventWriter
from exojet.runner.task_history import TaskHistory


class TaskReport(NamedTuple):
    """A task status to write."""

    task_id: str
    status: TaskStatus
    kind: str | None
    error_type: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None


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

    async def runner_status(
        self, status: RunnerStatus, *, task_before: TaskReport | None = None, task_after: TaskReport | None = None
    ) -> int:
        """Write `RunnerStatusUpdated`, with a task's status right before or after it (the two
        in one round trip, `EventWriter.write_pair`); only `runner/transitions.py` calls it."""
        runner = self._runner_event(status)
        if task_before is not None:
            task_seq, seq = await self._writer().write_pair(self._task_event(task_before), runner)
            self._recorded(task_before, task_seq)
        elif task_after is not None:
            seq, task_seq = await self._writer().write_pair(runner, self._task_event(task_after))
            self._recorded(task_after, task_seq)
        else:
            seq = await self._writer().write(runner)
        return seq

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
        report = TaskReport(task_id, status, kind, error_type, error_message, result)
        self._recorded(report, await self._writer().write(self._task_event(report)))

    def _runner_event(self, status: RunnerStatus) -> Build:
        return lambda eid, inc, at: RunnerStatusUpdated(
            event_id=eid, runner_id=self.runner_id, incarnation=inc, at=at, runner_status=status
        )

    def _task_event(self, report: TaskReport) -> Build:
        return lambda eid, inc, at: TaskStatusUpdated(
            event_id=eid,
            runner_id=self.runner_id,
            incarnation=inc,
            at=at,
            task_id=report.task_id,
            task_status=report.status,
            task_type=report.kind,
            error_type=report.error_type,
            error_message=report.error_message,
            result=report.result,
        )

    def _recorded(self, report: TaskReport, seq: int) -> None:
        self.history.record(report.task_id, report.status, report.kind)
        log = self.log.bind(task_id=report.task_id, seq=seq)
        if report.error_type:
            log.warning(f"task {report.status}: {report.error_type}: {report.error_message}")
        else:
            log.info(f"task {report.status}")

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
