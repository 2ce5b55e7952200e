"""The reconciler's clock decisions, pure: when a failed attempt's backoff has run out.

The planner says how long to wait (`RetryWait`); this measures the wait on a
clock the caller reads, from when the caller first saw the failure.
`supervisor/reconciler.py` passes `time.monotonic()`, the deterministic
simulation (`exojet.sim`) its simulated clock.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from exojet.bus.events import InstanceRetryDue, SupervisorEvent
from exojet.supervisor.actions import Action, RetryWait


class RetryTimer:
    """When this process first saw each failed (instance, attempt)."""

    def __init__(self) -> None:
        self.failed_since: dict[tuple[str, int], float] = {}

    def keep_only(self, actions: Iterable[Action]) -> None:
        """Forget waits the plan no longer asks for (retried by someone, deleted, or given up)."""
        waiting = {(a.instance_id, a.attempt) for a in actions if isinstance(a, RetryWait)}
        for key in [k for k in self.failed_since if k not in waiting]:
            del self.failed_since[key]

    def due_in(self, wait: RetryWait, now: float) -> float:
        """Seconds until the retry is due (<= 0: due now); the wait starts the first time it is asked."""
        since = self.failed_since.setdefault((wait.instance_id, wait.attempt), now)
        return since + wait.delay - now

    def written(self, wait: RetryWait) -> None:
        """Its InstanceRetryDue is in the log."""
        del self.failed_since[(wait.instance_id, wait.attempt)]


def retry_due_event(wait: RetryWait) -> InstanceRetryDue:
    """The event that ends the wait (its id makes a second supervisor's a duplicate)."""
    return InstanceRetryDue(
        event_id=f"{wait.instance_id}:retry:{wait.attempt}", instance_id=wait.instance_id, attempt=wait.attempt
    )


def stamped(event: SupervisorEvent, supervisor_id: str, at: float) -> SupervisorEvent:
    """The planner has no clock and no identity: the writer stamps them, for people reading the log
    (the server dedupes on `event_id`, not on the payload)."""
    return msgspec.structs.replace(event, supervisor_id=supervisor_id, at=at)
