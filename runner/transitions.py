"""The runner's status: the only place it changes, and the chats it runs at once.

Each method is one moment of the lifecycle (registered, a task starts, succeeds
or fails, a chat enters or leaves, shutdown), a generator that yields the
`RunnerStatusUpdated` write `runner/state_machine.py` decided. The status is held
as decided when its write is asked for: a runner's writes are one chain in order,
so a write asked for later lands after it, and no decision has to wait for the
write before it.

Chats (DESIGN.md, "Concurrent chats"): the first to enter moves the runner
`Ready -> Running`, the last to leave moves it back; a chat that fails in a way
that fails the runner moves it at once.
"""

from __future__ import annotations

from exojet.bus.events import RunnerStatusUpdated
from exojet.bus.statuses import RunnerStatus, status_name
from exojet.runner import state_machine
from exojet.runner.state_machine import Failure
from exojet.runner.steps import Say, Steps, Write

CHAT = "ChatCompletion"


class Transitions:
    """Holds `status`, the chats in flight, and moves the status, one write at a time."""

    def __init__(self, runner_id: str) -> None:
        self.runner_id = runner_id
        self.status: RunnerStatus = state_machine.registered()
        # Chats between `enter` and `leave`, and the status the first of them started in.
        self.chats = 0
        self.chats_began_in: RunnerStatus | None = None

    def _move(self, status: RunnerStatus) -> Steps[None]:
        before, self.status = self.status, status
        seq = yield Write(
            lambda eid, inc, at: RunnerStatusUpdated(
                event_id=eid, runner_id=self.runner_id, incarnation=inc, at=at, runner_status=status
            )
        )
        yield Say("info", f"{status_name(before)} -> {status_name(status)}", {"seq": seq})

    def registered(self) -> Steps[None]:
        """A new incarnation's first status (after its `RunnerRegistered`): it runs no chat."""
        self.chats, self.chats_began_in = 0, None
        yield from self._move(state_machine.registered())

    def start(self, task_type: str) -> Steps[RunnerStatus]:
        """Write the task's working status (if it has one); returns the status it started in."""
        before = self.status
        if working := state_machine.working_status(task_type):
            yield from self._move(working)
        return before

    def succeeded(self, task_type: str, before: RunnerStatus) -> Steps[None]:
        yield from self._move(state_machine.finished_status(task_type, before))

    def failed(self, failure: Failure) -> Steps[None]:
        """Write where a failed task leaves the runner (`state_machine.failed` decided it)."""
        yield from self._move(failure.status)

    def shutting_down(self) -> Steps[None]:
        yield from self._move(state_machine.shutting_down())

    def shut_down(self) -> Steps[None]:
        yield from self._move(state_machine.shut_down())

    def enter(self) -> Steps[RunnerStatus]:
        """A chat starts: the first moves the runner to Running. The status chats started in."""
        self.chats += 1
        if self.chats == 1 or self.chats_began_in is None:
            # Set before the move is written: a chat checked meanwhile is checked against it.
            self.chats_began_in = self.status
            yield from self.start(CHAT)
        return self.chats_began_in

    def leave(self, failure: Failure | None) -> Steps[None]:
        """A chat ended (`failure`: how, if it failed): the last moves the runner back to Ready,
        a failure that fails the runner moves it at once."""
        self.chats = max(0, self.chats - 1)
        before = self.chats_began_in or self.status
        if failure is not None and failure.status != state_machine.finished_status(CHAT, before):
            if failure.status != self.status:
                yield from self.failed(failure)
        elif self.chats == 0 and self.status == state_machine.working_status(CHAT):
            yield from self.succeeded(CHAT, before)

    def stop_chats(self) -> None:
        """Every chat in flight was stopped (a loss or a stop ends them)."""
        self.chats = 0

    def status_for(self, task_type: str) -> RunnerStatus:
        """The status a task is checked against: a chat beside others, the one they started in."""
        if task_type == CHAT and self.chats and self.chats_began_in is not None:
            return self.chats_began_in
        return self.status
