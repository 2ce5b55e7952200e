"""A runner's task loop: the tasks of `exo.tasks.<id>`, in order; chats side by side, up
to the loaded model's capacity (`runner/chat_slots.py`), any other task alone.

What to do with each task is decided without I/O (`runner/handling.py`, driven by the
simulation too); this does those steps with NATS, the engine and the models dir, each
chat's handling as an asyncio task of its own. A write refused because the supervisor
declared this runner lost (or a `RunnerLost` seen on its own subject while idle) makes
it re-register as a new incarnation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
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
from exojet.bus.sampling import choices
from exojet.bus.tasks import ChatCompletion, Shutdown, Task, UnloadModel, task_type
from exojet.runner.cancels import Cancels
from exojet.runner.chat_slots import ChatSlots
from exojet.runner.deadlines import CHAT_GRACE_S, Deadlines
from exojet.runner.engine_choice import EngineWanted
from exojet.runner.executor import Executor
from exojet.runner.handling import RunnerCore
from exojet.runner.registration import SubjectIO, registration
from exojet.runner.reports import Reports
from exojet.runner.shared_deadlines import SharedDeadlines
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
    Step,
    StopEngine,
    Term,
    Work,
    Write,
    drive,
)
from exojet.runner.write_chain import LastOn, TwinRunning

# Well inside the consumer's ack_wait, so long work is never redelivered meanwhile.
IN_PROGRESS_EVERY_S = streams.TASK_ACK_WAIT_S / 3
# How long a RunnerLost seen on our subject may take to show up in the log (see _check_lost).
LOST_CHECKS = 20
LOST_CHECK_INTERVAL_S = 0.05
_T = TypeVar("_T")


@dataclass
class Handling:
    """One task message being handled: what its steps act on."""

    msg: Msg
    # A chat's closing chunks on their way (see chat.Answer).
    delivering: asyncio.Future[None] | None = None


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
        self.subject = subjects.runner_events_subject(runner_id)
        self.reports = Reports(runner_id, lambda: self.io.writer())
        self.executor = Executor(
            runner_id, self.nc, models_dir, self.reports.progress, self.reports.load_progress, engine
        )
        self.cancels = Cancels(runner_id)
        chosen = self.executor.engine
        self.core = RunnerCore(
            runner_id,
            registration(runner_id, address, chosen.setup, chosen.engines, self.executor.ring_key),
            time.time,
            self.cancels,
        )
        self.io = SubjectIO(nc, self.core)
        self.deadlines = deadlines or Deadlines()
        self.chat_deadlines = SharedDeadlines()
        self.slots = ChatSlots(self.core.transitions, lambda: self.executor.chat_capacity)
        self.chat_grace_s = chat_grace_s
        # Set when a RunnerLost newer than our last write shows up on our subject.
        self.declared_lost = asyncio.Event()
        self.log = self.io.log

    @property
    def incarnation(self) -> int:
        return self.core.incarnation

    async def start(self) -> None:
        """Read the subject's history, register, answer what a crashed incarnation left running."""
        await self._drive(self.core.start())

    async def serve(self) -> int:
        """Run tasks until a Shutdown task (exit 0) or a twin shows up (exit 1)."""
        assert self.core.chain is not None, "serving starts once registered"
        tasks = await TaskConsumer(self.nc, self.runner_id).start()
        # An idle runner writes nothing, so no failed write would tell it that it
        # was declared lost (after a freeze, say): listen on its own subject for that.
        # A core subscription, not a stream consumer: its key may subscribe its own
        # subject, while a consumer's filter would be unchecked (docs/security.md).
        own = await self.nc.subscribe(self.subject, cb=self._on_own_message)
        # Cancels come beside the serial task queue, or a cancel would wait behind its
        # chat; a core subscription too (the runner's key may read its cancel subject).
        cancels = await self.nc.subscribe(subjects.cancel_subject(self.runner_id), cb=self.cancels.on_message)
        await client.until_done(self.nc.flush, "flush the subscriptions to NATS")
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
                    task_id = task.task_id or str(msg.metadata.sequence.stream)
                    # Delivered again while it runs (its in-progress acks could not reach a
                    # server that was away): it runs once, and its ack at the end settles both.
                    if task_id not in self.slots.running:
                        if not await self._room_for(choices(task), msg):
                            if await self._recover(msg):
                                return 0
                            continue
                        self.slots.start(task_id, msg, self.handle(msg), choices(task))
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
            chain = self.core.chain
            # A server cut off or restarting answers with a timeout: ask again until one answers.
            last = await client.until_done(
                lambda: client.last_on_subject(self.js, self.subject), "check whether this runner was declared lost"
            )
            if last is not None and chain is not None and last.seq > chain.last_seq:
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

    async def _room_for(self, n: int, msg: Msg) -> bool:
        """Wait until a chat of `n` answers fits beside the others (its message kept in progress);
        False when the loop must recover first."""
        if not self.slots.fits(n):
            keepalive = asyncio.ensure_future(_keep_in_progress(msg))
            try:
                while not self.slots.fits(n) and not self._interrupted:
                    await self._until(self.slots.wait())
            finally:
                keepalive.cancel()
        return not self._interrupted

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
        if msg is None:
            return await self._drive(self.core.handle_fenced(None))
        return await self._drive(self.core.handle_fenced(msg.metadata.sequence.stream, msg.data), msg)

    async def handle(self, msg: Msg) -> bool:
        """Run one task message; True when it was a Shutdown."""
        return await self._drive(self.core.handle(msg.metadata.sequence.stream, msg.data), msg)

    async def shutdown(self, task_id: str | None) -> None:
        """ShuttingDown, free the engine, (complete the task,) Shutdown: the last words of this incarnation."""
        await self._drive(self.core.shutdown(task_id))

    async def _drive(self, steps: Generator[Step, Any, _T], msg: Msg | None = None) -> _T:
        """Do `steps` (on task message `msg`, kept in progress meanwhile so long work is never
        redelivered)."""
        if msg is None:
            return await drive(steps, partial(self._step, None))
        handling = Handling(msg)
        keepalive = asyncio.ensure_future(_keep_in_progress(msg))
        try:
            return await drive(steps, partial(self._step, handling))
        finally:
            keepalive.cancel()
            if handling.delivering is not None and not handling.delivering.done():
                handling.delivering.cancel()

    async def _step(self, on: Handling | None, step: Step) -> object:
        """Do one step of the runner's decisions (`on`: the task message they handle)."""
        match step:
            case Write() | AckFloor() | ReadSubject() | HeartbeatSeen() | LastOn() | Say():
                return await self.io.do(step)
            case Refusal(task=task):
                return self.executor.refusal(task)
            case Work(task=task, task_id=task_id):
                return await self._work(task, task_id, on)
            case Delivered() if on is not None and on.delivering is not None:
                await on.delivering
            case Settle(task=task):
                return await self.executor.settle(task)
            case StopEngine():
                await self.executor.stop_engine()
            case Forget():
                await self.executor.forget()
            case Rejoined():
                self.declared_lost.clear()
            case Ack() if on is not None:
                await on.msg.ack()
            case Term() if on is not None:
                await on.msg.term()
        return None

    async def _work(self, task: Task, task_id: str, on: Handling | None) -> dict[str, Any] | None:
        """The task's work, cut at its deadline."""
        deadline = self.deadlines.for_task(task)
        chat = isinstance(task, ChatCompletion)
        try:
            async with self.chat_deadlines.budget(deadline) if chat else asyncio.timeout(deadline) as timer:
                if isinstance(task, ChatCompletion):
                    answer = await self.executor.chat(task, task_id, self.cancels.watch(task_id))
                    if on is not None:
                        on.delivering = answer.delivered
                    return answer.result
                return await self.executor.run(task, task_id)
        except TimeoutError:
            if timer.expired():
                raise DeadlinePassed(deadline, shared=chat) from None
            raise


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
