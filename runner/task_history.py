"""What a runner id's own subject says about its tasks: a pure fold, no I/O.

Delivery is at least once, so a runner must recognise a task it (or an earlier
incarnation) already answered. The same fold reads the subject at start-up and
records every status the runner writes afterwards, so the two can never disagree.
"""

from __future__ import annotations

from exojet.bus.events import RunnerLost, RunnerRegistered, TaskStatusUpdated
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus

# How many answered task ids a runner remembers. Only a task its consumer has
# not acknowledged can be delivered again (the runner acknowledges after the
# terminal status), and there is one at a time; the window is for a task id
# published twice, which is then skipped if it was answered among the newest.
DONE_WINDOW = 10_000


class TaskHistory:
    """Tasks with a terminal status (`done`, the newest DONE_WINDOW) and tasks reported Running
    and never finished: by the newest incarnation (`running`), or by an earlier one
    (`interrupted`, which a loss of a later incarnation does not answer: the projection
    forgets a runner's running task when it registers again)."""

    def __init__(self) -> None:
        # Insertion-ordered: trimmed to the newest DONE_WINDOW in batches.
        self.done: dict[str, None] = {}
        # task id -> task type, in the order the tasks started.
        self.running: dict[str, str | None] = {}
        self.interrupted: dict[str, str | None] = {}
        # The newest sequence of the runner's subject folded in (0: none).
        self.seq = 0

    def apply(self, event: object, seq: int = 0) -> None:
        """Fold one event of the runner's subject, stored at `seq` (others are ignored)."""
        self.seq = max(self.seq, seq)
        if isinstance(event, TaskStatusUpdated):
            self.record(event.task_id, event.task_status, event.task_type)
        elif isinstance(event, RunnerLost):
            self.lose()
        elif isinstance(event, RunnerRegistered):
            self.registered()

    def record(self, task_id: str, status: TaskStatus, task_type: str | None) -> None:
        """A status written for `task_id`."""
        if status in TERMINAL_TASK_STATUSES:
            self._answered(task_id)
            self.running.pop(task_id, None)
            self.interrupted.pop(task_id, None)
        elif status == TaskStatus.RUNNING:
            self.running[task_id] = task_type

    def registered(self) -> None:
        """A new incarnation registered: what the previous one left running is interrupted."""
        self.interrupted.update(self.running)
        self.running.clear()

    def lose(self) -> None:
        """The incarnation was declared lost: the cluster's view failed what it was running then."""
        for task_id in self.running:
            self._answered(task_id)
        self.running.clear()

    def unanswered(self) -> dict[str, str | None]:
        """Tasks reported Running and never answered (task id -> type), oldest first."""
        return {**self.interrupted, **self.running}

    def _answered(self, task_id: str) -> None:
        self.done[task_id] = None
        if len(self.done) > DONE_WINDOW + DONE_WINDOW // 10:
            self.done = dict.fromkeys(list(self.done)[-DONE_WINDOW:])

    def answered(self, task_id: str) -> bool:
        """True if `task_id` has a terminal status, here or in the cluster's view: never run it again."""
        return task_id in self.done
