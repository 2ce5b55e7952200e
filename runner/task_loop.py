"""A runner's task loop: the tasks of `exo.tasks.<id>`, in order; chats side by side, up
to the loaded model's capacity (`runner/chat_slots.py`), any other task alone.

Each task is decoded (poison is answered and terminated), skipped if the log
already holds its terminal status, checked against the state machine, then gets
`Running`, the transitions around its work and exactly one terminal status. A
write refused because the supervisor declared this runner lost (or a `RunnerLost`
seen on its own subject while idle) makes it re-register as a new incarnation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from exojet.bus import streams, subjects
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.events import RunnerLost
from exojet.bus.nats import client, connection
from exojet.bus.nats.task_consumer import TaskConsumer
from exojet.bus.statuses import RunnerStatus, TaskStatus
from exojet.bus.tasks import ChatCompletion, Shutdown, Task, UnloadModel, task_type
from exojet.runner import registration, state_machine
from exojet.runner.cancels import Cancels
from exojet.runner.chat_slots import ChatSlots
from exojet.runner.deadlines import Deadlines
from exojet.runner.engine_choice import EngineWanted
from exojet.runner.event_writer import Fenced
from exojet.runner.executor import Executor
from exojet.runner.registration import TwinRunning
from exojet.runner.reports import Reports
from exojet.runner.state_machine import Failure
from exojet.runner.task_history import TaskHistory
from exojet.runner.transitions import Transitions

# Well inside the consumer's ack_wait, so long work is never redelivered meanwhile.
IN_PROGRESS_EVERY_S = streams.TASK_ACK_WAIT_S / 3
# How long a RunnerLost seen on our subject may take to show up in the log (see _check_lost).
LOST_CHECKS = 20
LOST_CHECK_INTERVAL_S = 0.05
_T = TypeVar("_T")
# How long chats in flight may run on once a Shutdown or an UnloadModel is next.
CHAT_GRACE_S = 30.0


class Runner:
    """One runner id's life in this process: register, serve tasks, shut down."""

    def __init__(
        self,
        runner_id: str,
        nc: NATS,
        models_dir: Path,
        address: str,
        deadlines: Deadlines | None = None,
        engine: EngineWanted = "auto",
        chat_grace_s: float = CHAT_GRACE_S,
    ) -> None:
        self.runner_id = runner_id
        self.nc = nc
        self.js = nc.jetstream()
        self.address = address
        self.subject = subjects.runner_events_subject(runner_id)
        self.history = TaskHistory()
        self.reports = Reports(runner_id, self.history)
        self.transitions = Transitions(self.reports)
        self.executor = Executor(
            runner_id, self.nc, models_dir, self.reports.progress, self.reports.load_progress, engine
        )
        self.deadlines = deadlines or Deadlines()
        self.cancels = Cancels(runner_id)
        self.slots = ChatSlots(self.transitions, lambda: self.executor.chat_capacity)
        self.chat_grace_s = chat_grace_s
        # Set when a RunnerLost newer than our last write shows up on our subject.
        self.declared_lost = asyncio.Event()
        self.log = self.reports.log

    @property
    def incarnation(self) -> int:
        return self.reports.incarnation

    async def start(self) -> None:
        """Read the subject's history, register, answer what a crashed incarnation left running."""
        # A server not quite there yet (JetStream starting) is waited for, not an error.
        start = await client.until_done(
            lambda: registration.load_history(self.nc, self.runner_id, self.history), "read this runner's history"
        )
        self.log.bind(from_seq=start).info("read its subject from the task consumer's ack floor on")
        after_loss = False
        while True:
            try:
                await client.until_done(partial(self._register, after_loss, self.history), "register")
                await self._answer_interrupted()
                return
            except Fenced as fenced:
                if not (fenced.lost or fenced.late):
                    raise TwinRunning(str(fenced)) from None
                # Declared lost before it served (its first writes were slow: it heartbeats only
                # once started), or a write of the crashed incarnation landed after this one read
                # the subject. The loss failed nothing the crashed incarnation left running
                # (registering cleared that), so the next incarnation still answers those.
                self.log.warning(f"{fenced}; registering again")
                after_loss = after_loss or fenced.lost

    async def _register(self, after_loss: bool = False, history: TaskHistory | None = None) -> None:
        self.reports.writer = await registration.register(
            self.nc,
            self.runner_id,
            self.address,
            self.executor.engine.setup,
            self.executor.engine.engines,
            self.executor.ring_key,
            after_loss,
            history,
        )
        self.history.registered()
        await self.transitions.registered()

    async def _answer_interrupted(self) -> None:
        """Fail, explicitly, what a crashed incarnation left running: one terminal status each."""
        for task_id, kind in list(self.history.unanswered().items()):
            await self.reports.task_status(
                task_id,
                TaskStatus.FAILED,
                kind,
                error_type="RunnerRestarted",
                error_message=f"runner {self.runner_id} restarted (now incarnation "
                f"{self.incarnation}) while the task ran; send it again",
            )

    async def serve(self) -> int:
        """Run tasks until a Shutdown task (exit 0) or a twin shows up (exit 1)."""
        writer = self.reports.writer
        assert writer is not None
        tasks = await TaskConsumer(self.nc, self.runner_id).start()
        # An idle runner writes nothing, so no failed write would tell it that it
        # was declared lost (after a freeze, say): listen on its own subject for that.
        # A core subscription, not a stream consumer: its key may subscribe its own
        # subject, while a consumer's filter would be unchecked (docs/security.md).
        own = await self.nc.subscribe(self.subject, cb=self._on_own_message)
        # Cancels come beside the serial task queue, or a cancel would wait behind its
        # chat; a core subscription too (the runner's key may read its cancel subject).
        cancels = await self.nc.subscribe(subjects.cancel_subject(self.runner_id), cb=self.cancels.on_message)
        await self.nc.flush()
        # A loss declared before the subscription reached the server is in the log only;
        # so is one declared while this runner was disconnected from NATS.
        await self._check_lost("declared lost before serving", checks=1)
        lost_while_away = self._check_lost_after_reconnect
        connection.watch(self.nc).on_reconnect(lost_while_away)
        try:
            while True:
                while self.slots.full and not self._interrupted:
                    await self._until(self.slots.wait())
                msg = None if self._interrupted else await self._next_task(tasks)
                if msg is None:
                    if await self._recover():
                        return 0
                    continue
                task = _peek(msg)
                if isinstance(task, ChatCompletion):
                    self.slots.start(task.task_id or str(msg.metadata.sequence.stream), msg, self.handle(msg))
                    continue
                await self._chats_end_before(task, msg)
                if await self._recover(msg) if self._interrupted else await self.handle_fenced(msg):
                    return 0
        finally:
            await self.slots.stop_all()
            connection.watch(self.nc).remove_listener(lost_while_away)
            await cancels.unsubscribe()
            await own.unsubscribe()
            await tasks.stop()

    async def _check_lost_after_reconnect(self) -> None:
        await self._check_lost("declared lost while disconnected from NATS", checks=1)

    async def _on_own_message(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except BadInput:
            return
        if isinstance(event, RunnerLost) and event.incarnation == self.incarnation:
            await self._check_lost(f"declared lost ({event.reason})", checks=LOST_CHECKS)

    async def _check_lost(self, why: str, checks: int) -> None:
        """Set `declared_lost` if the log holds a RunnerLost after our last write.

        Subscribers get a message even when the stream refused it (a RunnerLost
        that lost the fencing race against our own write), and the stream stores
        it a moment after delivering it: ask the log, up to `checks` times.
        """
        for _ in range(checks):
            writer = self.reports.writer
            last = await client.last_on_subject(self.js, self.subject)
            if last is not None and writer is not None and last.seq > writer.last_seq:
                try:
                    lost = isinstance(decode_event(last.data), RunnerLost)
                except BadInput:
                    lost = False
                if lost:
                    self.log.bind(seq=last.seq).warning(why)
                    self.declared_lost.set()
                return
            await asyncio.sleep(LOST_CHECK_INTERVAL_S)

    @property
    def _interrupted(self) -> bool:
        """Declared lost, or a chat's write was fenced: the loop must recover first."""
        return self.declared_lost.is_set() or self.slots.fenced is not None

    async def _until(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """`work`'s result, or None once this incarnation is declared lost or a chat is fenced."""
        waiting = asyncio.ensure_future(work)
        stops = [asyncio.ensure_future(self.declared_lost.wait()), asyncio.ensure_future(self.slots.fence_seen.wait())]
        try:
            await asyncio.wait({waiting, *stops}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for stop in stops:
                stop.cancel()
            if not waiting.done():
                # Safe to cancel: the consumer keeps undelivered messages for the next call.
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        return None if waiting.cancelled() else waiting.result()

    async def _next_task(self, tasks: TaskConsumer) -> Msg | None:
        """The next task message, or None when this incarnation was declared lost while waiting."""
        return await self._until(tasks.next())

    async def _chats_end_before(self, task: Task | None, msg: Msg) -> None:
        """Wait for the chats in flight to end before `task` runs; a Shutdown or an UnloadModel
        gives them `chat_grace_s`, then cancels them, saying why."""
        if not self.slots.running:
            return
        keepalive = asyncio.ensure_future(_keep_in_progress(msg))
        try:
            grace = self.chat_grace_s if isinstance(task, Shutdown | UnloadModel) else None
            try:
                async with asyncio.timeout(grace):
                    while self.slots.running and not self._interrupted:
                        await self._until(self.slots.wait())
            except TimeoutError:
                kind = task_type(task) if task is not None else "task"
                for task_id in list(self.slots.running):
                    self.cancels.cancel(
                        task_id,
                        f"runner {self.runner_id} is to run {kind}: its chats had {grace:g} s to end and this "
                        "one ran on; send it again",
                    )
            while self.slots.running and not self._interrupted:
                await self._until(self.slots.wait())
        finally:
            keepalive.cancel()

    async def _recover(self, pending: Msg | None = None) -> bool:
        """After a loss or a fenced chat: stop the chats, rejoin, then answer their messages
        (and `pending`) again, as `handle_fenced` does for one; True if one was a Shutdown."""
        fenced = self.slots.fenced
        if fenced is not None and not fenced.lost:
            raise TwinRunning(str(fenced))
        again = await self.slots.stop_all()
        if fenced is not None:
            self.log.warning(f"{fenced}; re-registering")
        await self.handle_fenced(None)
        for msg in [*again, *([pending] if pending is not None else [])]:
            if await self.handle_fenced(msg):
                return True
        return False

    async def handle_fenced(self, msg: Msg | None) -> bool:
        """`handle` (None: no task, just come back), as a new incarnation each time we were declared lost."""
        rejoin = msg is None
        while True:
            try:
                if rejoin:
                    await self.rejoin()
                return await self.handle(msg) if msg is not None else False
            except Fenced as fenced:
                if not fenced.lost:
                    raise TwinRunning(str(fenced)) from None
                self.log.warning(f"{fenced}; re-registering")
                rejoin = True

    async def rejoin(self) -> None:
        """After a RunnerLost: a fresh incarnation, Idle, holding nothing.

        The loss failed the running task in the cluster's view, so that task is
        answered; a task whose Running never got written is run again as new.
        """
        self.history.lose()
        await self.executor.forget()
        await self._register(after_loss=True)
        self.declared_lost.clear()

    async def handle(self, msg: Msg) -> bool:
        """Run one task message; True when it was a Shutdown."""
        seq = msg.metadata.sequence.stream
        try:
            task = decode_task(msg.data)
        except BadInput as err:
            # Poison: answer it under its sequence and never see it again.
            await self.reports.task_status(
                str(seq), TaskStatus.FAILED, None, error_type=err.error_type, error_message=err.message
            )
            await msg.term()
            return False
        task_id = task.task_id or str(seq)
        kind = task_type(task)
        if self.history.answered(task_id):
            self.log.bind(task_id=task_id, seq=seq).info(
                f"{kind} already has a terminal status in the log: not run again"
            )
            await msg.ack()
            return False
        if (reason := self.cancels.asked(task_id)) is not None:
            # Cancelled while it waited in the queue: answered, never run.
            self.cancels.done(task_id)
            await self.reports.task_status(
                task_id, TaskStatus.CANCELLED, kind, error_type="Cancelled", error_message=reason
            )
            await msg.ack()
            return False
        refusal = self._refusal(task, kind)
        if refusal is not None:
            await self.reports.task_status(
                task_id, TaskStatus.FAILED, kind, error_type=refusal[0], error_message=refusal[1]
            )
            await msg.ack()
            return False
        self.log.bind(task_id=task_id, seq=seq).info(f"running {kind}")
        await self.reports.task_status(task_id, TaskStatus.RUNNING, kind)
        keepalive = asyncio.ensure_future(_keep_in_progress(msg))
        try:
            if isinstance(task, Shutdown):
                await self.shutdown(task_id)
                await msg.ack()
                return True
            outcome = await self._run(task, task_id, kind)
            if isinstance(outcome, Failure):
                await self.reports.task_status(
                    task_id, outcome.task_status, kind, error_type=outcome.error_type, error_message=outcome.message
                )
            elif outcome is not None and outcome.get("finish_reason") == "cancelled":
                await self.reports.task_status(
                    task_id,
                    TaskStatus.CANCELLED,
                    kind,
                    error_type="Cancelled",
                    error_message=self.cancels.asked(task_id) or "another rank of its group was cancelled",
                    result=outcome,
                )
            else:
                await self.reports.task_status(task_id, TaskStatus.COMPLETE, kind, result=outcome)
        except asyncio.CancelledError:
            await self.reports.task_status(
                task_id,
                TaskStatus.CANCELLED,
                kind,
                error_type="RunnerStopped",
                error_message=f"runner {self.runner_id} was stopped while the task ran",
            )
            raise
        finally:
            keepalive.cancel()
            self.cancels.done(task_id)
        await msg.ack()
        return False

    def _refusal(self, task: Task, kind: str) -> tuple[str, str] | None:
        """(error_type, message) refusing the task with the runner's status left as it is."""
        status = self.slots.status_for(kind)
        if not state_machine.accepts(kind, status):
            return "InvalidState", state_machine.invalid_state_message(kind, status)
        return self.executor.refusal(task)

    async def _run(self, task: Task, task_id: str, kind: str) -> dict[str, Any] | None | Failure:
        """The work between the transitions the state machine decides: its result, or how it failed."""
        chat = isinstance(task, ChatCompletion)
        before = await (self.slots.enter() if chat else self.transitions.start(kind))
        deadline = self.deadlines.for_task(task)
        delivering = None
        result: dict[str, Any] | None
        try:
            async with asyncio.timeout(deadline) as timer:
                if isinstance(task, ChatCompletion):
                    answer = await self.executor.chat(task, task_id, self.cancels.watch(task_id))
                    result, delivering = answer.result, answer.delivered
                else:
                    result = await self.executor.run(task, task_id)
        except Fenced:
            # Not the task's failure: the runner's identity is in question (see handle_fenced).
            raise
        except Exception as err:  # noqa: BLE001 - no task may end the runner
            if isinstance(err, TimeoutError) and timer.expired():
                self.log.bind(task_id=task_id).warning(f"{kind} passed its deadline of {deadline:.0f} s")
                failure = state_machine.timed_out(kind, before, deadline, await self.executor.settle(task))
                await (self.slots.leave(failure) if chat else self.transitions.failed(failure))
                return failure
            return await self._failed(kind, before, task_id, err)
        # A chat's closing chunks are stored while its RunnerReady is written (see chat.Answer).
        try:
            await (self.slots.leave(None) if chat else self.transitions.succeeded(kind, before))
            if delivering is not None:
                await delivering
        except Fenced:
            raise
        except Exception as err:  # noqa: BLE001 - no task may end the runner
            return await self._failed(kind, before, task_id, err, moved=True)
        finally:
            if delivering is not None and not delivering.done():
                delivering.cancel()
        return result

    async def _failed(
        self, kind: str, before: RunnerStatus, task_id: str, err: Exception, moved: bool = False
    ) -> Failure:
        """How `err` fails the task, with the runner moved where that leaves it (`moved`: its
        finished status is written already, so only another one is written)."""
        failure = state_machine.failed(kind, before, err)
        if failure.internal:
            self.log.bind(task_id=task_id).exception(f"{kind} failed unexpectedly")
        if failure.engine_lost:
            await self.executor.stop_engine()
        if kind == "ChatCompletion" and not moved:
            await self.slots.leave(failure)
        elif not moved or failure.status not in (self.transitions.status, state_machine.finished_status(kind, before)):
            await self.transitions.failed(failure)
        return failure

    async def shutdown(self, task_id: str | None) -> None:
        """ShuttingDown, free the engine, (complete the task,) Shutdown: the last words of this incarnation."""
        await self.transitions.shutting_down()
        await self.executor.engine.stop()
        if task_id is not None:
            await self.reports.task_status(task_id, TaskStatus.COMPLETE, "Shutdown")
        await self.transitions.shut_down()


def _peek(msg: Msg) -> Task | None:
    """The task in `msg`, to see what it is (None: poison, which `handle` answers)."""
    try:
        return decode_task(msg.data)
    except BadInput:
        return None


async def _keep_in_progress(msg: Msg) -> None:
    # Long work must not outlive ack_wait and get the task redelivered meanwhile.
    while True:
        await asyncio.sleep(IN_PROGRESS_EVERY_S)
        await msg.in_progress()
