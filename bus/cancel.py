"""`CancelTask`: stop a task, published on `exo.cancel.<runner_id>` (in `EXO_LOG`).

A runner reads its cancel subject beside its serial task queue, so a cancel
reaches a chat while it runs: the runner stops within one token and ends the
task `Cancelled`; a task that has not started yet is answered `Cancelled`
without running. A cancel for a task that already ended changes nothing.
"""

from __future__ import annotations

from exojet.bus.formats import LogMessage


class CancelTask(LogMessage, frozen=True, kw_only=True):
    task_id: str
    # Who asked and why, for people reading the log ("client disconnected", ...).
    reason: str = ""
