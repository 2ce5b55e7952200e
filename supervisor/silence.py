"""Liveness decisions, pure: which runners have been silent too long, on a clock the caller reads.

`supervisor/liveness.py` feeds it heartbeats and folded events with
`time.monotonic()`; the deterministic simulation (`exojet.sim`) feeds it the
same with its simulated clock, so both declare exactly the same runners lost.
"""

from __future__ import annotations

import msgspec

from exojet.bus import subjects
from exojet.bus.events import RunnerLost
from exojet.projections.rules import FINAL_STATUSES
from exojet.projections.state import ClusterState


class Silent(msgspec.Struct, frozen=True):
    """A runner silent for `silent_for` seconds, to be declared lost fenced on `last_event_seq`."""

    runner_id: str
    incarnation: int
    last_event_seq: int
    silent_for: float


class SilenceWatch:
    """The newest sign of life seen of each runner, and who is silent past `timeout`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # runner id -> the caller's clock at the newest sign of life it saw.
        self.last_seen: dict[str, float] = {}
        # (runner, last_event_seq) already declared, so a slow fold does not repeat it.
        self._declared: set[tuple[str, int]] = set()

    def heard(self, runner_id: str, now: float) -> None:
        """A heartbeat (or any sign of life) of `runner_id`."""
        self.last_seen[runner_id] = now

    def heard_on(self, subject: str, now: float) -> None:
        """A folded log message: one on a runner's own event subject shows that runner alive."""
        if subject.startswith(subjects.RUNNER_EVENTS_PREFIX + "."):
            self.last_seen[subject[len(subjects.RUNNER_EVENTS_PREFIX) + 1 :]] = now

    def grace(self, now: float) -> None:
        """Give every runner a full timeout from `now`: the gap was ours, not theirs."""
        for runner_id in self.last_seen:
            self.last_seen[runner_id] = now

    def stalled(self, slept: float, period: float) -> bool:
        """Whether a check loop that meant to sleep `period` and slept `slept` was itself stalled."""
        return slept > period + self.timeout / 2

    def silent(self, state: ClusterState, now: float) -> list[Silent]:
        """Runners to declare lost now: live in the projection, silent for `timeout`, not declared yet.

        A runner first met here gets a full timeout from `now`.
        """
        found = []
        for runner in state.runners.values():
            if runner.status in FINAL_STATUSES or runner.incarnation == 0:
                continue
            seen = self.last_seen.setdefault(runner.runner_id, now)
            if now - seen < self.timeout or (runner.runner_id, runner.last_event_seq) in self._declared:
                continue
            found.append(Silent(runner.runner_id, runner.incarnation, runner.last_event_seq, now - seen))
        return found

    def declared(self, silent: Silent) -> None:
        """Its RunnerLost is in the log: do not write it again."""
        self._declared.add((silent.runner_id, silent.last_event_seq))


def lost_event(silent: Silent, timeout: float, supervisor_id: str, at: float) -> RunnerLost:
    """The RunnerLost declaring `silent` (its id makes a second supervisor's declaration a duplicate)."""
    return RunnerLost(
        event_id=f"{silent.runner_id}:{silent.incarnation}:lost:{silent.last_event_seq}",
        runner_id=silent.runner_id,
        incarnation=silent.incarnation,
        at=at,
        supervisor_id=supervisor_id,
        reason=f"no heartbeat for {silent.silent_for:.1f} s (timeout {timeout:g} s)",
    )
