"""`exojet runner --id ID`: a runner process.

It registers a new incarnation on its own subject (fenced on the previous write),
heartbeats every second, and runs the tasks of `exo.tasks.ID` one at a time through
DESIGN.md's state machine: every transition is written before the work it names,
every accepted task gets `Running` then exactly one terminal status, and nothing a
task says can kill the process. MLX runs in a child process (`runner.engine`), so
downloads, loads and generations never stall the heartbeat.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from exojet.bus import client, streams, subjects
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import (
    DownloadProgress,
    RunnerLost,
    RunnerRegistered,
    RunnerStatusUpdated,
    TaskStatusUpdated,
)
from exojet.bus.statuses import (
    RunnerFailed,
    RunnerIdle,
    RunnerStatus,
    TaskStatus,
    status_name,
)
from exojet.bus.task_consumer import TaskConsumer
from exojet.bus.tasks import (
    ChatCompletion,
    ConnectToGroup,
    DownloadModel,
    Group,
    LoadModel,
    Shard,
    Shutdown,
    StartWarmup,
    Task,
    UnloadModel,
    stop_strings,
    task_type,
)
from exojet.models.store import InvalidModelId, default_models_dir, is_complete, model_dir
from exojet.runner import state_machine
from exojet.runner.chunks import ChunksNotStored, ChunkStream
from exojet.runner.download import DownloadError, DownloadStatus, download_model
from exojet.runner.engine import Done, Engine, EngineCrashed, EngineError, Generate
from exojet.runner.engine_protocol import Message
from exojet.runner.event_writer import EventWriter, Fenced
from exojet.runner.heartbeat import heartbeat
from exojet.runner.task_history import TaskHistory

VERSION = "0.1.0"
# A twin shows itself by heartbeating: wait a little over two beats for one.
TWIN_HEARTBEAT_WAIT_S = 2.5
# Well inside the consumer's ack_wait, so long work is never redelivered meanwhile.
IN_PROGRESS_EVERY_S = streams.TASK_ACK_WAIT_S / 3
GROUP_CONNECT_TIMEOUT_S = 30.0
DEFAULT_MAX_TOKENS = 256


class TaskFailed(Exception):
    """A task that ran and failed; `error_type` names the kind for the log."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class TwinRunning(Exception):
    """Another live process holds this runner id."""


def _advertised_address(nats_url: str) -> str:
    """The local address on the route to the NATS server: what other ranks can reach."""
    if env := os.environ.get("EXO_RUNNER_ADDRESS"):
        return env
    url = urlsplit(nats_url)
    try:
        # A UDP "connect" sends nothing; it only asks the kernel for the route.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((url.hostname or "127.0.0.1", url.port or 4222))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Runner:
    """One runner incarnation's life: register, serve tasks, shut down."""

    def __init__(self, runner_id: str, nc: NATS, models_dir: Path, nats_url: str) -> None:
        self.runner_id = runner_id
        self.nc = nc
        self.js = nc.jetstream()
        self.models_dir = models_dir
        self.address = _advertised_address(nats_url)
        self.subject = subjects.runner_events_subject(runner_id)
        self.status: RunnerStatus = RunnerIdle()
        self.engine = Engine()
        self.downloaded: Shard | None = None
        self.group: Group | None = None
        self.history = TaskHistory()
        # Set when a RunnerLost newer than our last write shows up on our subject.
        self.declared_lost = asyncio.Event()
        self.writer: EventWriter | None = None
        self.log = logger.bind(runner_id=runner_id)

    @property
    def incarnation(self) -> int:
        return self.writer.incarnation if self.writer else 0

    # -- registration -------------------------------------------------------

    async def register(self, after_loss: bool = False) -> None:
        """Write RunnerRegistered (incarnation + 1) and RunnerIdle, fenced on the subject's last write."""
        last = await client.last_on_subject(self.js, self.subject)
        incarnation, last_seq = 0, 0
        if last is not None:
            last_seq = last.seq
            try:
                previous = decode_event(last.data)
                incarnation = getattr(previous, "incarnation", 0)
            except BadInput:
                previous = None
            if not after_loss and not _final(previous) and await self._heartbeat_seen(incarnation):
                raise TwinRunning(f"runner {self.runner_id} is already running (incarnation {incarnation})")
        self.writer = EventWriter(self.js, self.runner_id, incarnation + 1, last_seq)
        memory = psutil.virtual_memory()
        await self.writer.write(
            lambda eid, inc, at: RunnerRegistered(
                event_id=eid,
                runner_id=self.runner_id,
                incarnation=inc,
                at=at,
                host=socket.gethostname(),
                pid=os.getpid(),
                memory_total=memory.total,
                memory_free=memory.available,
                engine="mlx",
                version=VERSION,
                address=self.address,
            )
        )
        await self.writer.write(
            lambda eid, inc, at: RunnerStatusUpdated(
                event_id=eid, runner_id=self.runner_id, incarnation=inc, at=at, runner_status=RunnerIdle()
            )
        )
        self.status = RunnerIdle()
        self.log.bind(seq=self.writer.last_seq).info(f"registered incarnation {self.incarnation}: RunnerIdle")

    async def _heartbeat_seen(self, incarnation: int) -> bool:
        seen = asyncio.Event()

        async def on_beat(msg: Msg) -> None:
            seen.set()

        sub = await self.nc.subscribe(subjects.heartbeat_subject(self.runner_id), cb=on_beat)
        try:
            await asyncio.wait_for(seen.wait(), TWIN_HEARTBEAT_WAIT_S)
            return True
        except TimeoutError:
            return False
        finally:
            await sub.unsubscribe()

    async def load_history(self) -> None:
        """From this runner id's own subject: tasks already finished, and tasks an
        earlier incarnation started and never finished (it crashed meanwhile)."""

        def collect(env: Envelope) -> None:
            try:
                self.history.apply(decode_event(env.data))
            except BadInput:
                return

        await client.replay_subject(self.js, self.subject, collect)

    async def answer_interrupted(self) -> None:
        """Fail, explicitly, what a crashed incarnation left running: one terminal status each."""
        for task_id, kind in list(self.history.running.items()):
            await self._task_status(
                task_id,
                TaskStatus.FAILED,
                kind,
                error_type="RunnerRestarted",
                error_message=f"runner {self.runner_id} restarted (now incarnation "
                f"{self.incarnation}) while the task ran; send it again",
            )

    # -- writes -------------------------------------------------------------

    async def _set_status(self, status: RunnerStatus) -> None:
        assert self.writer is not None
        await self.writer.write(
            lambda eid, inc, at: RunnerStatusUpdated(
                event_id=eid, runner_id=self.runner_id, incarnation=inc, at=at, runner_status=status
            )
        )
        self.log.info(f"{status_name(self.status)} -> {status_name(status)}")
        self.status = status

    async def _task_status(
        self,
        task_id: str,
        status: TaskStatus,
        kind: str | None,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        assert self.writer is not None
        seq = await self.writer.write(
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

    async def _progress(self, status: DownloadStatus) -> None:
        assert self.writer is not None
        await self.writer.write(
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

    # -- the task loop ------------------------------------------------------

    async def serve(self) -> int:
        """Run tasks until a Shutdown task (exit 0) or a twin shows up (exit 1)."""
        assert self.writer is not None
        tasks = await TaskConsumer(self.nc, self.runner_id).start()
        # An idle runner writes nothing, so no failed write would tell it that it
        # was declared lost (after a freeze, say): watch its own subject for that.
        own = await client.follow(self.js, self._on_own_event, start_seq=self.writer.last_seq + 1, subject=self.subject)
        try:
            while True:
                if await self.handle_fenced(await self._next_task(tasks)):
                    return 0
        finally:
            await own.unsubscribe()
            await tasks.stop()

    def _on_own_event(self, env: Envelope) -> None:
        # A RunnerLost older than our last write is one we already came back from.
        if self.writer is None or env.seq <= self.writer.last_seq:
            return
        try:
            event = decode_event(env.data)
        except BadInput:
            return
        if isinstance(event, RunnerLost):
            self.log.bind(seq=env.seq).warning(f"declared lost ({event.reason})")
            self.declared_lost.set()

    async def _next_task(self, tasks: TaskConsumer) -> Msg | None:
        """The next task message, or None when this incarnation was declared lost while waiting."""
        waiting = asyncio.ensure_future(tasks.next())
        lost = asyncio.ensure_future(self.declared_lost.wait())
        try:
            await asyncio.wait({waiting, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not waiting.done():
                # Safe to cancel: the consumer keeps undelivered messages for the next call.
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        return None if waiting.cancelled() else waiting.result()

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
        await self.engine.stop()
        self.group = None
        self.downloaded = None
        await self.register(after_loss=True)
        self.declared_lost.clear()

    async def handle(self, msg: Msg) -> bool:
        """Run one task message; True when it was a Shutdown."""
        seq = msg.metadata.sequence.stream
        try:
            task = decode_task(msg.data)
        except BadInput as err:
            # Poison: answer it under its sequence and never see it again.
            await self._task_status(
                str(seq), TaskStatus.FAILED, None, error_type=err.error_type, error_message=err.message
            )
            await msg.term()
            return False
        task_id = task.task_id or str(seq)
        kind = task_type(task)
        log = self.log.bind(task_id=task_id, seq=seq)
        if self.history.answered(task_id):
            log.info(f"{kind} already has a terminal status in the log: not run again")
            await msg.ack()
            return False
        if not state_machine.accepts(kind, self.status):
            await self._task_status(
                task_id,
                TaskStatus.FAILED,
                kind,
                error_type="InvalidState",
                error_message=state_machine.invalid_state_message(kind, self.status),
            )
            await msg.ack()
            return False
        if refusal := self._precondition(task):
            await self._task_status(task_id, TaskStatus.FAILED, kind, error_type=refusal[0], error_message=refusal[1])
            await msg.ack()
            return False
        log.info(f"running {kind}")
        await self._task_status(task_id, TaskStatus.RUNNING, kind)
        keepalive = asyncio.ensure_future(_keep_in_progress(msg))
        try:
            if isinstance(task, Shutdown):
                await self.shutdown(task_id)
                await msg.ack()
                return True
            result = await self._run(task, task_id, kind)
            await self._task_status(task_id, TaskStatus.COMPLETE, kind, result=result)
        except TaskFailed as err:
            await self._task_status(
                task_id, TaskStatus.FAILED, kind, error_type=err.error_type, error_message=err.message
            )
        except asyncio.CancelledError:
            await self._task_status(
                task_id,
                TaskStatus.CANCELLED,
                kind,
                error_type="RunnerStopped",
                error_message=f"runner {self.runner_id} was stopped while the task ran",
            )
            raise
        finally:
            keepalive.cancel()
        await msg.ack()
        return False

    def _precondition(self, task: Task) -> tuple[str, str] | None:
        """A reason to refuse the task before any transition, leaving the status as it is."""
        if not isinstance(task, LoadModel):
            return None
        shard = task.shard or self.downloaded
        if shard is None:
            return (
                "ModelNotDownloaded",
                (f"LoadModel names no model and runner {self.runner_id} has downloaded none: send DownloadModel first"),
            )
        try:
            present = is_complete(model_dir(self.models_dir, shard.model_id))
        except (InvalidModelId, OSError):
            present = False
        if not present:
            return (
                "ModelNotDownloaded",
                (f"model {shard.model_id} is not downloaded on runner {self.runner_id}: send DownloadModel first"),
            )
        return None

    async def _run(self, task: Task, task_id: str, kind: str) -> dict[str, Any] | None:
        """The transitions around the work: working status first, then where the task leaves us."""
        before = self.status
        if working := state_machine.working_status(kind):
            await self._set_status(working)
        try:
            result = await self._work(task, task_id)
        except Fenced:
            # Not the task's failure: the runner's identity is in question (see serve).
            raise
        except ChunksNotStored as err:
            # The bus failed the client, not the engine: the runner is as usable as before.
            await self._set_status(state_machine.finished_status(kind, before))
            raise TaskFailed("ChunksNotStored", str(err)) from None
        except (EngineCrashed, EngineError, DownloadError) as err:
            error_type, message = _describe(err)
            if isinstance(err, EngineCrashed):
                await self.engine.stop()
                self.group = None
            await self._set_status(RunnerFailed(error_message=message))
            raise TaskFailed(error_type, message) from None
        except Exception as err:  # noqa: BLE001 - a bug of ours must not end the runner
            # A bug of ours must cost one task, not the runner: fail it loudly
            # and start the engine afresh, as after a crash.
            self.log.bind(task_id=task_id).exception(f"{kind} failed unexpectedly")
            await self.engine.stop()
            self.group = None
            message = f"internal error in {kind}: {err!r} (see the runner's log)"
            await self._set_status(RunnerFailed(error_message=message))
            raise TaskFailed("InternalError", message) from None
        await self._set_status(state_machine.finished_status(kind, before))
        return result

    async def _work(self, task: Task, task_id: str) -> dict[str, Any] | None:
        match task:
            case DownloadModel(shard=shard):
                path = await download_model(
                    shard.model_id, self.models_dir, revision=shard.revision, on_progress=self._progress
                )
                self.downloaded = shard
                return {"model_id": shard.model_id, "path": str(path)}
            case ConnectToGroup(group=group):
                await self._fresh_engine()
                connected = await self.engine.connect_group(
                    group.group_id, group.world_size, group.rank, list(group.hosts), GROUP_CONNECT_TIMEOUT_S
                )
                self.group = group
                return {"group_id": group.group_id, "rank": connected.rank, "world_size": connected.world_size}
            case LoadModel():
                wanted = task.shard or self.downloaded
                assert wanted is not None  # checked by _precondition
                if not self.engine.alive:
                    await self.engine.start()
                loaded = await self.engine.load(
                    str(model_dir(self.models_dir, wanted.model_id)), wanted.start_layer, wanted.end_layer
                )
                self.downloaded = wanted
                return {
                    "model_id": wanted.model_id,
                    "n_layers": loaded.n_layers,
                    "start_layer": loaded.start_layer,
                    "end_layer": loaded.end_layer,
                }
            case StartWarmup():
                await self.engine.warmup()
                return None
            case ChatCompletion():
                return await self._chat(task, task_id)
            case UnloadModel():
                # A child that joined a group cannot leave it: end it (a later
                # load starts a fresh one). A crashed child holds nothing.
                if self.group is not None or not self.engine.alive:
                    await self.engine.stop()
                    self.group = None
                else:
                    await self.engine.unload()
                return None
        raise TaskFailed("NotSupported", f"{task_type(task)} is not supported by this runner")

    async def _fresh_engine(self) -> None:
        if self.engine.alive:
            await self.engine.stop()
        await self.engine.start()

    async def _chat(self, task: ChatCompletion, task_id: str) -> dict[str, Any]:
        request = Generate(
            messages=[Message(m.role, m.content) for m in task.messages],
            max_tokens=task.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=task.temperature if task.temperature is not None else 0.0,
            top_p=task.top_p if task.top_p is not None else 1.0,
            seed=_lockstep_seed(task) if self.group is not None else task.seed,
            stop=stop_strings(task),
        )
        emits = task.emit_rank == (self.group.rank if self.group else 0)
        chunks = ChunkStream(self.js, task.stream_id or task_id, task_id) if emits else None
        done = None
        async for reply in self.engine.generate(request):
            if isinstance(reply, Done):
                done = reply
            elif chunks is not None:
                await chunks.add(reply.text)
        assert done is not None
        if chunks is not None:
            await chunks.finish(done.finish_reason)
        return {
            "text": done.text if emits else "",
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "tokens_per_second": round(done.tokens_per_second, 2),
        }

    async def shutdown(self, task_id: str | None) -> None:
        """ShuttingDown, free the engine, (complete the task,) Shutdown: the last words of this incarnation."""
        await self._set_status(state_machine.shutting_down())
        await self.engine.stop()
        if task_id is not None:
            await self._task_status(task_id, TaskStatus.COMPLETE, "Shutdown")
        await self._set_status(state_machine.shut_down())


def _lockstep_seed(task: ChatCompletion) -> int | None:
    """Every rank of a group must sample the same tokens: without a seed of the
    user's, derive one from what all ranks' tasks share (the chat's stream id)."""
    if task.seed is not None or (task.temperature or 0.0) == 0.0:
        return task.seed
    return zlib.crc32((task.stream_id or "").encode())


def _final(event: object) -> bool:
    """True if `event` ends an incarnation: nothing of it can still be running."""
    if isinstance(event, RunnerLost):
        return True
    return isinstance(event, RunnerStatusUpdated) and status_name(event.runner_status) == "RunnerShutdown"


def _describe(err: Exception) -> tuple[str, str]:
    """(error_type, message in words a person can act on) for an engine or download failure."""
    match err:
        case EngineCrashed():
            return "EngineCrashed", str(err)
        case EngineError(error_type=error_type, message=message):
            return error_type, message
        case DownloadError(error_type=error_type, message=message):
            return error_type, message
    return type(err).__name__, str(err)


async def _keep_in_progress(msg: Msg) -> None:
    # Long work must not outlive ack_wait and get the task redelivered meanwhile.
    while True:
        await asyncio.sleep(IN_PROGRESS_EVERY_S)
        await msg.in_progress()


async def run_runner(runner_id: str, nats_url: str, models_dir: Path) -> int:
    """Connect, register, serve until Shutdown or a signal; returns the exit code."""
    stop = asyncio.Event()
    lost_connection = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await client.connect(
        nats_url, name=f"runner-{runner_id}", reconnect_attempts=60, on_closed=lost_connection.set
    )
    runner = Runner(runner_id, nc, models_dir, nats_url)
    beat: asyncio.Task[None] | None = None
    try:
        await streams.ensure_streams(runner.js)
        await runner.load_history()
        await runner.register()
        await runner.answer_interrupted()
        beat = asyncio.ensure_future(heartbeat(nc, runner_id, lambda: runner.incarnation))
        serving = asyncio.ensure_future(runner.serve())
        stopped = asyncio.ensure_future(stop.wait())
        gone = asyncio.ensure_future(lost_connection.wait())
        await asyncio.wait({serving, stopped, gone}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopped, gone):
            waiter.cancel()
        if serving.done():
            return serving.result()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        if lost_connection.is_set():
            runner.log.error("lost the connection to NATS for good; exiting")
            return 1
        runner.log.info("stopping on signal")
        await runner.shutdown(None)
        return 0
    except TwinRunning as err:
        print(f"error: {err}", file=sys.stderr)
        runner.log.error(str(err))
        return 1
    finally:
        if beat is not None:
            beat.cancel()
        await runner.engine.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not nc.is_closed:
            await nc.close()


def main(runner_id: str, nats_url: str, models_dir: Path | None) -> int:
    """Entry point of `exojet runner`."""
    if problem := subjects.id_problem(runner_id):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(run_runner(runner_id, nats_url, models_dir or default_models_dir()))
