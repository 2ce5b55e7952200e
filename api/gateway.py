"""The API's NATS side: route chats through the supervisors, read their answers, cancel them.

One gateway per API process holds three subscriptions, whatever the number of
requests in flight:

- the log (`EXO_LOG`, from the sequence it started at): which runner got each
  chat's rank tasks, their statuses, `ChatRefused`, `RunnerLost`, instance ends;
- the chunks (`EXO_CHUNKS`, new ones only): every chat's text as it is generated;
- the heartbeats (core NATS): a chat whose runner falls silent for the liveness
  timeout ends with an error, supervisor or not, so no request ever hangs.

Each request registers a `ChatStream` (by chat id) before it publishes its
`RouteChatCompletion`, so nothing about it can arrive unseen. The gateway keeps
no other state: several API processes may serve the same cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from exojet.api.chat_request import ChatRequest
from exojet.api.config import DEFAULT_LIVENESS_TIMEOUT_S
from exojet.api.errors import ApiError, unavailable
from exojet.bus import streams, subjects
from exojet.bus.cancel import CancelTask
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.commands import CancelChat, RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import ChatRefused, InstanceDeleted, InstanceFailed, RunnerLost, TaskStatusUpdated
from exojet.bus.ids import chat_id_of, chat_task_id
from exojet.bus.nats import client, connection, stream_setup
from exojet.bus.nats.chunk_order import ChunkOrder, decode_chunk
from exojet.bus.nats.follower import Follower
from exojet.bus.nats.query_client import SUPERVISOR_WAIT_S, QueryFailed, query
from exojet.bus.statuses import TERMINAL_TASK_STATUSES
from exojet.bus.tasks import ChatCompletion

# How long a chat may wait for a supervisor to route it before the API answers 503: as long as
# any query waits for a supervisor (through a leader election and a reconnect).
DEFAULT_ROUTE_TIMEOUT_S = SUPERVISOR_WAIT_S
# How long the cluster view used for model checks and /v1/models is reused.
STATE_TTL_S = 1.0
# A chat for a model Ready in a view this young goes ahead without asking the supervisors
# again (the view is refreshed beside it): a query is a round trip on a chat's first token.
READY_VIEW_S = 5.0
# A chat abandoned before any of its ranks was published is forgotten after this: the log's
# CancelChat keeps it from being routed later; this covers a rank task published before the
# supervisors folded that cancel, which the API then cancels when it shows up.
ABANDONED_TTL_S = 60.0
WATCHDOG_EVERY_S = 0.5
# The largest page a supervisor answers (projections/queries.py): instances beyond it
# (ended ones, listed last) do not matter to the API.
INSTANCES_PAGE = 500
# The most ranks a cancel by id looks up when this process did not start the chat.
MAX_RANKS = 64


class Chunk(msgspec.Struct, frozen=True):
    text: str


class Ended(msgspec.Struct, frozen=True):
    """The emitting rank's terminal status."""

    status: str
    error_type: str | None
    error_message: str | None
    result: dict[str, Any]


class Lost(msgspec.Struct, frozen=True):
    """The chat cannot end by itself any more (its runner or instance is gone)."""

    reason: str


Item = Chunk | Ended | Lost


class ChatStream:
    """One routed chat as the HTTP side reads it: `items` in order, then it is over."""

    def __init__(self, chat_id: str, command_id: str) -> None:
        self.chat_id = chat_id
        self.command_id = command_id
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        # Set when rank 0's task is in the log, or the chat was refused or lost first.
        self.settled = asyncio.Event()
        self.refusal: ApiError | None = None
        self.tasks: dict[str, str] = {}  # task id -> runner id, every rank seen so far
        self.emitter: str | None = None  # rank 0's runner
        self.instance_id: str | None = None
        self.routed_at = 0.0
        self.over = False
        self.abandoned: str | None = None
        self.abandoned_at = 0.0
        self.order = ChunkOrder(lambda text: self.items.put_nowait(Chunk(text)))
        self.fast: Subscription | None = None

    def offer(self, index: int, text: str) -> None:
        """A chunk from either way it comes (see `bus/nats/chunk_order.py`): each index once, in order."""
        if not self.over:
            self.order.offer(index, text)

    def end(self, item: Ended | Lost) -> None:
        if not self.over:
            self.over = True
            self.items.put_nowait(item)
            self.settled.set()


class Gateway:
    """The API process's connection to the cluster (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        *,
        liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT_S,
        route_timeout: float = DEFAULT_ROUTE_TIMEOUT_S,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.liveness_timeout = liveness_timeout
        self.route_timeout = route_timeout
        self._chats: dict[str, ChatStream] = {}
        self._by_task: dict[str, ChatStream] = {}
        self._beats: dict[str, float] = {}
        self._subs: list[Follower | Subscription] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._state: dict[str, Any] | None = None
        self._state_at = 0.0
        self._refreshing = False
        self.log = logger.bind(component="api")

    async def start(self) -> None:
        """Create the streams if needed and subscribe (from the log's end now)."""
        # Tried again while a cluster's JetStream is not answering yet (a node-by-node start, an election).
        await client.until_done(lambda: stream_setup.ensure_streams(self.js), "create the streams")
        start = await client.until_done(lambda: client.last_seq(self.js), "read the log's last sequence") + 1
        self._subs.append(await client.follow(self.nc, self._on_log, start_seq=start))
        # Both follows resume right after the last message seen when NATS comes back.
        chunks_start = (
            await client.until_done(lambda: client.last_seq(self.js, streams.CHUNKS_STREAM), "read the chunks' end")
        ) + 1
        self._subs.append(
            await client.follow(
                self.nc,
                self._on_chunk,
                start_seq=chunks_start,
                subject=f"{subjects.CHUNKS_PREFIX}.>",
                stream=streams.CHUNKS_STREAM,
            )
        )
        self._subs.append(await self.nc.subscribe(subjects.HEARTBEATS, cb=self._on_beat))
        self._watchdog = asyncio.create_task(self._watch(), name="api-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in self._subs:
            await sub.unsubscribe()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # -- the cluster view ---------------------------------------------------

    async def cluster(self, fresh: bool = False) -> dict[str, Any]:
        """The supervisors' live instances (reused for STATE_TTL_S); ApiError(503) when none answers."""
        now = time.monotonic()
        if fresh or self._state is None or now - self._state_at > STATE_TTL_S:
            try:
                # Instances only, live ones first: all an API needs to know what is served.
                self._state = await query(self.nc, "state", timeout=2.0, sections=["instances"], limit=INSTANCES_PAGE)
            except QueryFailed as err:
                raise unavailable(f"{err.code}: {err.message}", "no_supervisor") from None
            self._state_at = time.monotonic()
        return self._state

    def recent_view(self) -> dict[str, Any] | None:
        """The last cluster view if at most READY_VIEW_S old (a fresh one is asked for
        beside it once it is older than STATE_TTL_S), else None."""
        age = time.monotonic() - self._state_at
        if self._state is None or age > READY_VIEW_S:
            return None
        if age > STATE_TTL_S and not self._refreshing:
            self._refreshing = True
            self._spawn(self._refresh())
        return self._state

    async def _refresh(self) -> None:
        try:
            await self.cluster(fresh=True)
        except ApiError:
            pass  # the next request that needs the view asks, and answers 503 itself
        finally:
            self._refreshing = False

    # -- chats --------------------------------------------------------------

    async def open_chat(self) -> ChatStream:
        """Register a chat before it is published, so nothing about it goes unseen.

        Its chunks come two ways (see `bus/nats/chunk_order.py`): on a core subscription of its
        own subject as the runner publishes them, and from this gateway's `EXO_CHUNKS` follow."""
        command_id = uuid.uuid4().hex[:16]
        stream = ChatStream(chat_id_of(command_id, 0), command_id)

        async def on_chunk(msg: Msg) -> None:
            self._offer(stream, msg.data)

        # Sent before the command on the same connection: the server has it first.
        stream.fast = await self.nc.subscribe(subjects.chunks_filter(stream.chat_id), cb=on_chunk)
        self._chats[stream.chat_id] = stream
        return stream

    async def submit(self, stream: ChatStream, req: ChatRequest) -> None:
        """Publish the RouteChatCompletion and wait until a supervisor routed it (or refused it)."""
        command = RouteChatCompletion(
            command_id=stream.command_id,
            messages=req.messages,
            model_id=req.model,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
            raw=req.raw,
        )
        await client.publish(
            self.js, subjects.COMMANDS, command, msg_id=stream.command_id, timeout=connection.DEDUPED_PUBLISH_TRY_S
        )
        try:
            await asyncio.wait_for(stream.settled.wait(), self.route_timeout)
        except TimeoutError:
            raise unavailable(
                f"no supervisor routed {stream.chat_id} to an instance of {req.model} within {self.route_timeout:g} s",
                "not_routed",
            ) from None
        if stream.refusal is not None:
            raise stream.refusal

    def close(self, stream: ChatStream, reason: str) -> None:
        """The HTTP side is done with `stream`: forget it, cancelling the chat first if it is not over."""
        if stream.over:
            self._forget(stream)
            return
        # Nobody reads its text any more (a refused request would otherwise hold one a minute).
        self._drop_fast(stream)
        stream.abandoned = reason
        stream.abandoned_at = time.monotonic()
        # Detached: this runs while the request's task is being cancelled.
        self._spawn(self._cancel_tasks(dict(stream.tasks), reason))
        if not stream.tasks:
            self._spawn(self._cancel_unrouted(stream.chat_id, reason))

    async def cancel(self, chat_id: str, reason: str) -> dict[str, str] | None:
        """Cancel every rank of `chat_id`; the tasks asked (id -> runner), None if the chat is unknown."""
        stream = self._chats.get(chat_id)
        if stream is not None and stream.tasks:
            tasks = dict(stream.tasks)
        elif stream is not None and not stream.settled.is_set():
            # Still waiting to be routed (its first rank task would have settled it): the
            # request ends, the stream is kept a while for a rank task already on its way.
            stream.refusal = ApiError(409, f"{chat_id} Cancelled: {reason}", type="cancelled", code="cancelled")
            stream.settled.set()
            tasks = {}
        else:
            tasks = await self._find_tasks(chat_id)
            if not tasks and stream is None:
                return None
        if not tasks and stream is not None:
            # Not routed: the log says so for good, and a rank task a supervisor published
            # before it folded that is cancelled as soon as it shows up here.
            stream.abandoned, stream.abandoned_at = reason, time.monotonic()
            await self._cancel_unrouted(chat_id, reason)
        await self._cancel_tasks(tasks, reason)
        return tasks

    async def _find_tasks(self, chat_id: str) -> dict[str, str]:
        tasks = {}
        for rank in range(MAX_RANKS):
            task_id = chat_task_id(chat_id, rank)
            try:
                reply = await query(self.nc, "task", timeout=2.0, task_id=task_id)
            except QueryFailed as err:
                if err.code == "NotFound":
                    break
                raise unavailable(f"{err.code}: {err.message}", "no_supervisor") from None
            task = reply["task"]
            if task["status"] not in TERMINAL_TASK_STATUSES:
                tasks[task_id] = task["runner_id"]
        return tasks

    async def _cancel_tasks(self, tasks: dict[str, str], reason: str) -> None:
        for task_id, runner_id in tasks.items():
            await self._publish_cancel(task_id, runner_id, reason)

    async def _cancel_unrouted(self, chat_id: str, reason: str) -> None:
        """Tell the supervisors, through the log, never to route `chat_id`."""
        ack = await client.publish(
            self.js, subjects.COMMANDS, CancelChat(chat_id=chat_id, reason=reason), msg_id=f"{chat_id}:cancel"
        )
        self.log.bind(chat_id=chat_id, seq=ack.seq).info(f"cancel sent before routing: {reason}")

    async def _publish_cancel(self, task_id: str, runner_id: str, reason: str) -> None:
        ack = await client.publish(
            self.js,
            subjects.cancel_subject(runner_id),
            CancelTask(task_id=task_id, reason=reason),
            msg_id=f"{task_id}:cancel",
        )
        self.log.bind(task_id=task_id, runner_id=runner_id, seq=ack.seq).info(f"cancel sent: {reason}")

    def _forget(self, stream: ChatStream) -> None:
        self._chats.pop(stream.chat_id, None)
        for task_id in stream.tasks:
            self._by_task.pop(task_id, None)
        self._drop_fast(stream)

    def _drop_fast(self, stream: ChatStream) -> None:
        if stream.fast is not None:
            self._spawn(_unsubscribe(stream.fast))
            stream.fast = None

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    # -- what arrives -------------------------------------------------------

    def _on_log(self, env: Envelope) -> None:
        subject = env.subject
        if subject.startswith(subjects.TASKS_PREFIX + "."):
            if b'"stream_id"' in env.data:
                self._on_task(env, subject[len(subjects.TASKS_PREFIX) + 1 :])
        elif subject.startswith(subjects.RUNNER_EVENTS_PREFIX + ".") or subject == subjects.SUPERVISOR_EVENTS:
            if self._chats:
                self._on_event(env)

    def _on_task(self, env: Envelope, runner_id: str) -> None:
        try:
            task = decode_task(env.data)
        except BadInput:
            return
        if not isinstance(task, ChatCompletion) or task.task_id is None:
            return
        stream = self._chats.get(task.stream_id or "")
        if stream is None:
            return
        stream.tasks[task.task_id] = runner_id
        self._by_task[task.task_id] = stream
        if task.task_id == chat_task_id(stream.chat_id, 0):
            stream.emitter = runner_id
            stream.instance_id = task.instance_id
            stream.routed_at = time.monotonic()
            stream.settled.set()
        if stream.abandoned is not None:
            self._spawn(self._publish_cancel(task.task_id, runner_id, stream.abandoned))

    def _on_event(self, env: Envelope) -> None:
        try:
            event = decode_event(env.data)
        except BadInput:
            return
        match event:
            case TaskStatusUpdated(task_id=task_id, task_status=status) if status in TERMINAL_TASK_STATUSES:
                stream = self._by_task.get(task_id)
                if stream is not None and task_id == chat_task_id(stream.chat_id, 0):
                    stream.end(Ended(str(status), event.error_type, event.error_message, event.result or {}))
            case RunnerLost(runner_id=runner_id, reason=reason):
                self._end_where(lambda s: runner_id in s.tasks.values(), f"runner {runner_id} was lost: {reason}")
            case InstanceFailed(instance_id=instance_id, reason=reason):
                self._end_where(lambda s: s.instance_id == instance_id, f"instance {instance_id} failed: {reason}")
            case InstanceDeleted(instance_id=instance_id):
                self._end_where(lambda s: s.instance_id == instance_id, f"instance {instance_id} was deleted")
            case ChatRefused(chat_id=chat_id, error_type=error_type, reason=reason):
                stream = self._chats.get(chat_id)
                if stream is not None and not stream.settled.is_set():
                    stream.refusal = ApiError(
                        429,
                        f"{error_type}: {reason}",
                        type="rate_limit_exceeded",
                        code="queue_full",
                        headers={"Retry-After": "1"},
                    )
                    stream.over = True
                    stream.settled.set()

    def _end_where(self, which: Callable[[ChatStream], bool], reason: str) -> None:
        for stream in list(self._chats.values()):
            if not stream.over and which(stream):
                stream.end(Lost(reason))

    def _on_chunk(self, env: Envelope) -> None:
        stream = self._chats.get(subjects.chunks_stream_id(env.subject))
        if stream is not None:
            self._offer(stream, env.data)

    def _offer(self, stream: ChatStream, data: bytes) -> None:
        try:
            chunk = decode_chunk(data)
        except msgspec.DecodeError as err:
            self.log.bind(chat_id=stream.chat_id).warning(f"a chunk of {stream.chat_id} is not one: {err}")
            return
        stream.offer(chunk.index, chunk.text)

    async def _on_beat(self, msg: Msg) -> None:
        runner_id = subjects.runner_of(msg.subject)
        if runner_id is not None:
            self._beats[runner_id] = time.monotonic()

    async def _watch(self) -> None:
        """End chats whose runner went silent; forget abandoned chats once over (or never routed)."""
        while True:
            await asyncio.sleep(WATCHDOG_EVERY_S)
            now = time.monotonic()
            ours = connection.watch(self.nc)
            # Our own link's outage silences every runner: heartbeats count from our reconnect.
            back_at = now if not ours.connected else (ours.reconnected_at or 0.0)
            for stream in list(self._chats.values()):
                if stream.abandoned is not None and (stream.over or now - stream.abandoned_at > ABANDONED_TTL_S):
                    self._forget(stream)
                elif stream.emitter is not None and not stream.over:
                    last = max(self._beats.get(stream.emitter, 0.0), stream.routed_at, back_at)
                    if now - last > self.liveness_timeout:
                        stream.end(
                            Lost(f"runner {stream.emitter} sent no heartbeat for {now - last:.1f} s (it is gone)")
                        )


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as err:  # a closed connection has nothing left to unsubscribe
        logger.bind(component="api").debug(f"unsubscribe: {err!r}")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.bind(component="api").opt(exception=task.exception()).error("background publish failed")
