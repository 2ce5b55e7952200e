"""A runner's decisions, without I/O: its start, its registration, each task's handling.

Each is a generator of `runner/steps.py`'s steps: `runner/task_loop.py` drives it
with NATS and the engine (several chats' handlings at once, up to the loaded
model's capacity), `sim/runner.py` with the simulated log, consumer and disk.

A task is decoded (poison is answered and terminated), skipped if the log already
holds its terminal status, checked against the state machine, then gets `Running`,
the transitions around its work and exactly one terminal status. A write refused
because the supervisor declared this runner lost makes it register again as a new
incarnation (`handle_fenced`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from exojet.bus import subjects
from exojet.bus.chat_ends import INVALID_STATE
from exojet.bus.codec import BadInput, decode_task
from exojet.bus.events import RunnerLost, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.lifecycle import FINAL_STATUSES
from exojet.bus.statuses import RunnerStatus, TaskStatus, status_name
from exojet.bus.tasks import ChatCompletion, Shutdown, Task, task_type
from exojet.runner import state_machine
from exojet.runner.cancels import Cancels
from exojet.runner.state_machine import Failure
from exojet.runner.steps import (
    Ack,
    AckFloor,
    DeadlinePassed,
    Delivered,
    Forget,
    HeartbeatSeen,
    ReadSubject,
    Refusal,
    Rejoined,
    Say,
    Settle,
    Steps,
    StopEngine,
    Term,
    Work,
    Write,
)
from exojet.runner.task_history import TaskHistory
from exojet.runner.transitions import CHAT, Transitions
from exojet.runner.write_chain import Build, Fenced, LastOn, TwinRunning, WriteChain, decoded

Outcome = dict[str, Any] | None | Failure
# Why a task is not run: (its terminal status, error_type, message); no status when it was answered already.
NotRun = tuple[TaskStatus | None, str, str]


def _incarnation(event: object) -> int:
    return int(getattr(event, "incarnation", 0))


def _final(event: object) -> bool:
    """True if `event` ends an incarnation: nothing of it can still be running."""
    if isinstance(event, RunnerLost):
        return True
    return isinstance(event, RunnerStatusUpdated) and status_name(event.runner_status) in FINAL_STATUSES


class RunnerCore:
    """One runner id's state in this process, and the decisions that change it.

    `registration` builds the `RunnerRegistered` of each incarnation (the process's
    facts: host, memory, engines ...); `now` is the clock of the events' `at`."""

    def __init__(self, runner_id: str, registration: Build, now: Callable[[], float], cancels: Cancels) -> None:
        self.runner_id = runner_id
        self.subject = subjects.runner_events_subject(runner_id)
        self.registration = registration
        self.now = now
        self.cancels = cancels
        self.history = TaskHistory()
        self.transitions = Transitions(runner_id)
        # The current incarnation's writes (None before the first registration).
        self.chain: WriteChain | None = None

    @property
    def incarnation(self) -> int:
        return self.chain.incarnation if self.chain is not None else 0

    @property
    def status(self) -> RunnerStatus:
        return self.transitions.status

    # A start and a registration -------------------------------------------------------

    def start(self) -> Steps[None]:
        """Read the subject's history, register, answer what a crashed incarnation left running."""
        start = yield from self.read_history()
        yield Say("info", "read its subject from the task consumer's ack floor on", {"from_seq": start})
        after_loss = False
        while True:
            try:
                yield from self.register(after_loss, fold=True)
                yield from self._answer_interrupted()
                return
            except Fenced as fenced:
                if not (fenced.lost or fenced.late):
                    raise TwinRunning(str(fenced)) from None
                # Declared lost before it served (its first writes were slow: it heartbeats only
                # once started), or a write of the crashed incarnation landed after this one read
                # the subject. The loss failed nothing the crashed incarnation left running
                # (registering cleared that), so the next incarnation still answers those.
                yield Say("warning", f"{fenced}; registering again", kind="registered again")
                after_loss = after_loss or fenced.lost

    def read_history(self) -> Steps[int]:
        """Fold this runner id's own subject into `history`: tasks already finished, and tasks an
        earlier incarnation started and never finished (it crashed meanwhile); returns the seq read from.

        The task consumer's ack floor is the checkpoint: every task at or below it was acknowledged
        (after its terminal status) and is never delivered again, and every status of a task above
        it was written after that task, so the subject from the floor on is all the dedupe needs."""
        floor: int = yield AckFloor()
        self.history.seq = max(self.history.seq, floor)
        yield from self._fold_subject(floor + 1)
        return floor + 1

    def _fold_subject(self, start_seq: int) -> Steps[None]:
        envelopes = yield ReadSubject(start_seq)
        for env in envelopes:
            self.history.apply(decoded(env), env.seq)

    def register(self, after_loss: bool = False, fold: bool = False) -> Steps[None]:
        """Write `RunnerRegistered` for incarnation + 1, fenced on the subject's last write, then
        its first status. `TwinRunning` if another process holds the id (not after a loss: then
        the previous holder is this very process).

        With `fold`, everything on the subject up to the write it is fenced on is folded into the
        history first: a RunnerLost, or a late write of the crashed incarnation, may have landed
        since the history was read (the twin check alone waits seconds)."""
        last = yield LastOn(self.subject)
        if last is not None and not after_loss and not _final(decoded(last)) and (yield HeartbeatSeen()):
            raise TwinRunning(f"runner {self.runner_id} is already running (incarnation {_incarnation(decoded(last))})")
        while fold and last is not None and last.seq > self.history.seq:
            yield from self._fold_subject(self.history.seq + 1)
            last = yield LastOn(self.subject)
        incarnation, last_seq = (_incarnation(decoded(last)), last.seq) if last is not None else (0, 0)
        self.chain = WriteChain(self.runner_id, incarnation + 1, last_seq, self.now)
        yield Write(self.registration)
        self.history.registered()
        yield from self.transitions.registered()

    def _answer_interrupted(self) -> Steps[None]:
        """Fail, explicitly, what a crashed incarnation left running: one terminal status each."""
        for task_id, kind in list(self.history.unanswered().items()):
            yield from self.task_status(
                task_id,
                TaskStatus.FAILED,
                kind,
                error_type="RunnerRestarted",
                error_message=f"runner {self.runner_id} restarted (now incarnation "
                f"{self.incarnation}) while the task ran; send it again",
            )

    def rejoin(self) -> Steps[None]:
        """After a RunnerLost: a fresh incarnation, Idle, holding nothing.

        The loss failed the running task in the cluster's view, so that task is
        answered; a task whose Running never got written is run again as new.
        """
        yield Say("warning", "declared lost: registering a new incarnation", kind="re-registered after a loss")
        self.history.lose()
        yield Forget()
        yield from self.register(after_loss=True)
        yield Rejoined()

    # Tasks --------------------------------------------------------------------------

    def handle_fenced(self, seq: int | None, data: bytes = b"") -> Steps[bool]:
        """`handle` the task message at `seq` (None: no task, just come back), as a new
        incarnation each time this one was declared lost."""
        rejoin = seq is None
        while True:
            try:
                if rejoin:
                    yield from self.rejoin()
                return (yield from self.handle(seq, data)) if seq is not None else False
            except Fenced as fenced:
                if not fenced.lost:
                    raise TwinRunning(str(fenced)) from None
                yield Say("warning", f"{fenced}; re-registering")
                rejoin = True

    def handle(self, seq: int, data: bytes) -> Steps[bool]:
        """Run the task message stored at `seq`; True when it was a Shutdown."""
        try:
            task = decode_task(data)
        except BadInput as err:
            # Poison: answer it under its sequence and never see it again.
            yield from self.task_status(
                str(seq), TaskStatus.FAILED, None, error_type=err.error_type, error_message=err.message
            )
            yield Term()
            return False
        task_id = task.task_id or str(seq)
        kind = task_type(task)
        refusal = yield from self._refusal(task, task_id, kind, seq)
        if refusal is not None:
            status, error_type, message = refusal
            if status is not None:
                yield from self.task_status(task_id, status, kind, error_type=error_type, error_message=message)
            yield Ack()
            return False
        yield Say("info", f"running {kind}", {"task_id": task_id, "seq": seq})
        yield from self.task_status(task_id, TaskStatus.RUNNING, kind)
        try:
            if isinstance(task, Shutdown):
                yield from self.shutdown(task_id)
                yield Ack()
                return True
            outcome = yield from self._run(task, task_id, kind)
            yield from self._answer(task_id, kind, outcome)
        except asyncio.CancelledError:
            yield from self.task_status(
                task_id,
                TaskStatus.CANCELLED,
                kind,
                error_type="RunnerStopped",
                error_message=f"runner {self.runner_id} was stopped while the task ran",
            )
            raise
        finally:
            self.cancels.done(task_id)
        yield Ack()
        return False

    def _refusal(self, task: Task, task_id: str, kind: str, seq: int) -> Steps[NotRun | None]:
        """Why the task is not run: (its terminal status, error_type, message); a status of None
        when it is answered already. None to run it."""
        if self.history.answered(task_id):
            text = f"{kind} already has a terminal status in the log: not run again"
            yield Say("info", text, {"task_id": task_id, "seq": seq}, "answered task skipped")
            return None, "", ""
        if (reason := self.cancels.asked(task_id)) is not None:
            # Cancelled while it waited in the queue: answered, never run.
            self.cancels.done(task_id)
            return TaskStatus.CANCELLED, "Cancelled", reason
        status = self.transitions.status_for(kind)
        if not state_machine.accepts(kind, status):
            return TaskStatus.FAILED, INVALID_STATE, state_machine.invalid_state_message(kind, status)
        held: tuple[str, str] | None = yield Refusal(task)
        return (TaskStatus.FAILED, *held) if held is not None else None

    def _run(self, task: Task, task_id: str, kind: str) -> Steps[Outcome]:
        """The work between the transitions the state machine decides: its result, or how it failed."""
        chat = isinstance(task, ChatCompletion)
        before = yield from (self.transitions.enter() if chat else self.transitions.start(kind))
        try:
            result: dict[str, Any] | None = yield Work(task, task_id)
        except Fenced:
            # Not the task's failure: the runner's identity is in question (see handle_fenced).
            raise
        except DeadlinePassed as passed:
            yield Say("warning", f"{kind} {passed}", {"task_id": task_id})
            failure = state_machine.timed_out(kind, before, passed.seconds, (yield Settle(task)))
            yield from (self.transitions.leave(failure) if chat else self.transitions.failed(failure))
            return failure
        except Exception as err:  # noqa: BLE001 - no task may end the runner
            return (yield from self._failed(kind, before, task_id, err))
        # A chat's closing chunks are stored while its RunnerReady is written (see chat.Answer).
        try:
            yield from (self.transitions.leave(None) if chat else self.transitions.succeeded(kind, before))
            if chat:
                yield Delivered()
        except Fenced:
            raise
        except Exception as err:  # noqa: BLE001 - no task may end the runner
            return (yield from self._failed(kind, before, task_id, err, moved=True))
        return result

    def _failed(
        self, kind: str, before: RunnerStatus, task_id: str, err: Exception, moved: bool = False
    ) -> Steps[Failure]:
        """How `err` fails the task, with the runner moved where that leaves it (`moved`: its
        finished status is written already, so only another one is written)."""
        failure = state_machine.failed(kind, before, err)
        if failure.internal:
            yield Say("error", f"{kind} failed unexpectedly", {"task_id": task_id}, error=err)
        if failure.engine_lost:
            yield StopEngine()
        transitions = self.transitions
        if kind == CHAT and not moved:
            yield from transitions.leave(failure)
        elif not moved or failure.status not in (transitions.status, state_machine.finished_status(kind, before)):
            yield from transitions.failed(failure)
        return failure

    def _answer(self, task_id: str, kind: str, outcome: Outcome) -> Steps[None]:
        """The task's terminal status: how it failed, or its result."""
        if isinstance(outcome, Failure):
            yield from self.task_status(
                task_id, outcome.task_status, kind, error_type=outcome.error_type, error_message=outcome.message
            )
        elif outcome is not None and outcome.get("finish_reason") == "cancelled":
            yield from self.task_status(
                task_id,
                TaskStatus.CANCELLED,
                kind,
                error_type="Cancelled",
                error_message=self.cancels.asked(task_id) or "another rank of its group was cancelled",
                result=outcome,
            )
        else:
            yield from self.task_status(task_id, TaskStatus.COMPLETE, kind, result=outcome)

    def shutdown(self, task_id: str | None) -> Steps[None]:
        """ShuttingDown, free the engine, (complete the task,) Shutdown: the last words of this incarnation."""
        yield from self.transitions.shutting_down()
        yield StopEngine()
        if task_id is not None:
            yield from self.task_status(task_id, TaskStatus.COMPLETE, "Shutdown")
        yield from self.transitions.shut_down()

    def task_status(
        self,
        task_id: str,
        status: TaskStatus,
        kind: str | None,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Steps[None]:
        """Write `TaskStatusUpdated` and record it in the task history."""
        seq = yield Write(
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
        binds = {"task_id": task_id, "seq": seq}
        if error_type:
            yield Say("warning", f"task {status}: {error_type}: {error_message}", binds)
        else:
            yield Say("info", f"task {status}", binds)
