"""One chat session: route chats through the supervisors (or follow a task sent to a runner),
read their answers in order, and end each one, whatever happens, with a named reason.

`exojet chat`, `exojet task --wait`, the API and the benches all read chats here. One session
holds three subscriptions, whatever the number of chats in flight:

- the log (`EXO_LOG`, from the sequence it started at): which runner got each chat's rank
  tasks, their statuses, `ChatRefused`, `RunnerLost`, instance ends;
- the chunks (`EXO_CHUNKS`, new ones only): every chat's text as it is generated;
- the heartbeats (core NATS): a chat whose runner falls silent for the liveness timeout ends
  with an error, supervisor or not, so no reader ever hangs.

Each chat registers a `ChatStream` before its command (or task) is published, so nothing about
it can arrive unseen. How a chat ends is in `bus/chat_ends.py`. The session keeps no other
state: several processes may read the same cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from exojet.bus import streams, subjects
from exojet.bus.chat_ends import (
    ChatCancelled,
    ChatError,
    ChatLost,
    ChatNotRouted,
    ChatUnfinished,
    Ended,
    refusal,
)
from exojet.bus.chunks import ChoiceDelta, decode_chunk, piece_of
from exojet.bus.codec import BadInput, decode_command, decode_event, decode_task
from exojet.bus.commands import DeleteInstance, RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import ChatRefused, InstanceDeleted, InstanceFailed, RunnerLost, TaskStatusUpdated
from exojet.bus.ids import chat_id_of, chat_task_id
from exojet.bus.nats import chat_cancels, client, connection, stream_setup
from exojet.bus.nats.chat_stream import CHUNKS_END, ChatStream
from exojet.bus.nats.follower import Follower
from exojet.bus.nats.query_client import SUPERVISOR_WAIT_S
from exojet.bus.results import ChatResult, result_as
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.bus.tools import ToolCallDelta, missing_pieces

DEFAULT_LIVENESS_TIMEOUT_S = 5.0
# How long a chat may wait for a supervisor to route it: as long as any query waits for a
# supervisor (through a leader election and a reconnect).
DEFAULT_ROUTE_TIMEOUT_S = SUPERVISOR_WAIT_S
# A chat abandoned before any of its ranks was published is forgotten after this: the log's
# CancelChat keeps it from being routed later; this covers a rank task published before the
# supervisors folded that cancel, which the session then cancels when it shows up.
ABANDONED_TTL_S = 60.0
WATCHDOG_EVERY_S = 0.5
# Statuses of tasks nobody follows yet, kept for a task whose id is its sequence (known only
# once published): its first statuses may come before it is followed.
UNCLAIMED_KEPT = 256


class ChatSession:
    """A process's chats on one connection (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        *,
        liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT_S,
        route_timeout: float = DEFAULT_ROUTE_TIMEOUT_S,
        keep_unclaimed: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.liveness_timeout = liveness_timeout
        self.route_timeout = route_timeout
        # Keep the first statuses of tasks not followed yet (see UNCLAIMED_KEPT): a reader of
        # tasks it sends itself; an API routes chats, whose ranks it knows before they start.
        self.keep_unclaimed = keep_unclaimed
        self._chats: dict[str, ChatStream] = {}
        self._by_task: dict[str, ChatStream] = {}
        self._unclaimed: OrderedDict[str, list[TaskStatusUpdated]] = OrderedDict()
        self._beats: dict[str, float] = {}
        self._subs: list[Follower | Subscription] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.log = logger.bind(component="chat")

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
        self._watchdog = asyncio.create_task(self._watch(), name="chat-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for stream in list(self._chats.values()):
            self._forget(stream)
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in self._subs:
            await sub.unsubscribe()

    # -- chats --------------------------------------------------------------

    async def open_chat(self) -> ChatStream:
        """Register a routed chat before it is published, so nothing about it goes unseen.

        Its chunks come two ways (see `bus/chunk_order.py`): on a core subscription of its
        own subject as the runner publishes them, and from this session's `EXO_CHUNKS` follow."""
        command_id = uuid.uuid4().hex[:16]
        chat_id = chat_id_of(command_id, 0)
        stream = ChatStream(chat_id, chat_task_id(chat_id, 0), command_id)
        # Sent before the command on the same connection: the server has it first.
        stream.subs.append(await self._fast_chunks(stream))
        self._chats[stream.chat_id] = stream
        return stream

    async def submit(self, stream: ChatStream, command: RouteChatCompletion) -> None:
        """Publish the chat's RouteChatCompletion and wait until a supervisor routed it (or
        refused it): ChatNotRouted, ChatQueueFull, ChatIncapable or ChatCancelled when it was not."""
        assert command.command_id == stream.command_id, "the command of another chat"
        await client.publish(
            self.js, subjects.COMMANDS, command, msg_id=stream.command_id, timeout=connection.DEDUPED_PUBLISH_TRY_S
        )
        try:
            await asyncio.wait_for(stream.settled.wait(), self.route_timeout)
        except TimeoutError:
            raise ChatNotRouted(
                stream.chat_id,
                f"no supervisor routed it to an instance of {command.model_id or 'any model'} "
                f"within {self.route_timeout:g} s (is `exojet supervisor` running?)",
            ) from None
        if stream.refusal is not None:
            raise stream.refusal

    async def follow_task(self, runner_id: str, task_id: str, stream_id: str, *, ready: bool) -> ChatStream:
        """Follow a task published to `runner_id` itself (a chat's text is on `stream_id`).
        `ready`: its runner takes it at once (a chat sent to a Ready runner), so its heartbeats
        are watched from now; else from when it starts."""
        stream = ChatStream(stream_id, task_id)
        stream.tasks[task_id] = runner_id
        stream.emitter = runner_id
        stream.watched_since = time.monotonic() if ready else None
        stream.settled.set()
        self._chats[stream_id] = stream
        self._by_task[task_id] = stream
        # From the subject's first stored chunk: a task whose id is its sequence was followed
        # only once published.
        stream.subs.append(await self._fast_chunks(stream))
        stream.subs.append(
            await client.follow(
                self.nc,
                lambda env: self._offer(stream, env.data),
                subject=subjects.chunks_subject(runner_id, stream_id),
                stream=streams.CHUNKS_STREAM,
            )
        )
        for event in self._unclaimed.pop(task_id, []):
            self._on_status(stream, event)
        return stream

    async def answer(self, stream: ChatStream) -> AsyncIterator[str | ToolCallDelta | ChoiceDelta | Ended]:
        """The chat's text (tool-call pieces, and the text of further answers or with its tokens'
        log-probabilities as ChoiceDelta) as it comes, then its `Ended`; raises the ChatError it
        ended with instead."""
        said: dict[int, str] = {}
        called: list[ToolCallDelta] = []
        while True:
            item = await stream.items.get()
            if isinstance(item, str | ChoiceDelta):
                choice, text = (0, item) if isinstance(item, str) else (item.choice, item.text)
                said[choice] = said.get(choice, "") + text
                yield item
                continue
            if isinstance(item, ToolCallDelta):
                called.append(item)
                yield item
                continue
            if isinstance(item, ChatError):
                raise item
            # Chunks and the status come on two streams: the result's text is the whole
            # answer, so give whatever chunks have not been read yet.
            result = item.result
            for choice, final in [(0, result.text), *((c.index, c.text) for c in result.choices)]:
                had = said.get(choice, "")
                if final.startswith(had) and len(final) > len(had):
                    tail = final[len(had) :]
                    yield tail if choice == 0 else ChoiceDelta(choice=choice, text=tail)
            for rest in missing_pieces(called, result.tool_calls):
                yield rest
            yield item
            return

    def close(self, stream: ChatStream, reason: str) -> None:
        """The reader is done with `stream`: forget it, cancelling its tasks first unless its
        emitting task ended (a chat lost to a deleted instance would run on unread)."""
        if stream.task_ended:
            self._forget(stream)
            return
        if stream.over:
            self._spawn(self._cancel_tasks(dict(stream.tasks), reason))
            self._forget(stream)
            return
        # Nobody reads its text any more (a refused request would otherwise hold one a minute).
        self._drop_subs(stream)
        stream.abandoned = reason
        stream.abandoned_at = time.monotonic()
        # Detached: this runs while the reader's task is being cancelled.
        self._spawn(self._cancel_tasks(dict(stream.tasks), reason))
        if not stream.tasks:
            self._spawn(chat_cancels.cancel_unrouted(self.js, stream.chat_id, reason))

    async def cancel(self, chat_id: str, reason: str) -> dict[str, str] | None:
        """Cancel every rank of `chat_id`; the tasks asked (id -> runner), None if the chat is unknown.
        Raises QueryFailed when it must ask the supervisors and none answers."""
        stream = self._chats.get(chat_id)
        if stream is not None and stream.tasks:
            tasks = dict(stream.tasks)
        elif stream is not None and not stream.settled.is_set():
            # Still waiting to be routed (its first rank task would have settled it): the
            # reader ends, the stream is kept a while for a rank task already on its way.
            stream.refusal = ChatCancelled(chat_id, reason)
            stream.settled.set()
            tasks = {}
        else:
            tasks = await chat_cancels.find_tasks(self.nc, chat_id)
            if not tasks and stream is None:
                return None
        if not tasks and stream is not None:
            # Not routed: the log says so for good, and a rank task a supervisor published
            # before it folded that is cancelled as soon as it shows up here.
            stream.abandoned, stream.abandoned_at = reason, time.monotonic()
            await chat_cancels.cancel_unrouted(self.js, chat_id, reason)
        await self._cancel_tasks(tasks, reason)
        return tasks

    async def _cancel_tasks(self, tasks: dict[str, str], reason: str) -> None:
        for task_id, runner_id in tasks.items():
            await chat_cancels.publish_cancel(self.js, task_id, runner_id, reason)

    async def _fast_chunks(self, stream: ChatStream) -> Subscription:
        async def on_chunk(msg: Msg) -> None:
            self._offer(stream, msg.data)

        return await self.nc.subscribe(subjects.chunks_filter(stream.chat_id), cb=on_chunk)

    def _forget(self, stream: ChatStream) -> None:
        if self._chats.get(stream.chat_id) is stream:
            del self._chats[stream.chat_id]
        for task_id in stream.tasks:
            self._by_task.pop(task_id, None)
        self._drop_subs(stream)

    def _drop_subs(self, stream: ChatStream) -> None:
        for sub in stream.subs:
            self._spawn(_unsubscribe(sub))
        stream.subs = []

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
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
            if self._chats or self.keep_unclaimed:
                self._on_event(env)
        elif subject == subjects.COMMANDS and self._chats and b"DeleteInstance" in env.data:
            self._on_delete(env)

    def _on_task(self, env: Envelope, runner_id: str) -> None:
        try:
            task = decode_task(env.data)
        except BadInput:
            return
        if not isinstance(task, ChatCompletion) or task.task_id is None:
            return
        stream = self._chats.get(task.stream_id or "")
        if stream is None or stream.command_id is None:
            return
        stream.tasks[task.task_id] = runner_id
        self._by_task[task.task_id] = stream
        if task.task_id == stream.emitter_task:
            stream.emitter = runner_id
            stream.instance_id = task.instance_id
            stream.watched_since = time.monotonic()
            stream.settled.set()
        if stream.abandoned is not None:
            self._spawn(chat_cancels.publish_cancel(self.js, task.task_id, runner_id, stream.abandoned))

    def _on_event(self, env: Envelope) -> None:
        try:
            event = decode_event(env.data)
        except BadInput:
            return
        match event:
            case TaskStatusUpdated(task_id=task_id):
                stream = self._by_task.get(task_id)
                if stream is not None:
                    self._on_status(stream, event)
                elif self.keep_unclaimed:
                    self._unclaimed.setdefault(task_id, []).append(event)
                    while len(self._unclaimed) > UNCLAIMED_KEPT:
                        self._unclaimed.popitem(last=False)
            case RunnerLost(runner_id=runner_id, reason=reason):
                self._end_where(lambda s: runner_id in s.tasks.values(), f"runner {runner_id} was lost: {reason}")
            case InstanceFailed(instance_id=instance_id, reason=reason):
                self._end_where(lambda s: s.instance_id == instance_id, f"instance {instance_id} failed: {reason}")
            case InstanceDeleted(instance_id=instance_id):
                self._end_where(lambda s: s.instance_id == instance_id, f"instance {instance_id} was deleted")
            case ChatRefused(chat_id=chat_id, error_type=error_type, reason=reason):
                stream = self._chats.get(chat_id)
                if stream is not None and not stream.settled.is_set():
                    stream.refuse(refusal(chat_id, error_type, reason))

    def _on_delete(self, env: Envelope) -> None:
        """An instance deleted ends its chats at once (its runners cancel them as they unload)."""
        try:
            command = decode_command(env.data)
        except BadInput:
            return
        if isinstance(command, DeleteInstance):
            deleted = command.instance_id
            self._end_where(lambda s: s.instance_id == deleted, f"instance {deleted} was deleted")

    def _on_status(self, stream: ChatStream, event: TaskStatusUpdated) -> None:
        if stream.on_status is not None:
            stream.on_status(event)
        if event.task_id != stream.emitter_task:
            return
        status = event.task_status
        stream.task_ended = status in TERMINAL_TASK_STATUSES
        if status == TaskStatus.RUNNING and stream.watched_since is None:
            stream.watched_since = time.monotonic()
        elif status == TaskStatus.COMPLETE:
            stream.end(Ended(result_as(ChatResult, event.result) or ChatResult()))
        elif status in TERMINAL_TASK_STATUSES:
            stream.end(ChatUnfinished(stream.chat_id, str(status), event.error_type, event.error_message))

    def _end_where(self, which: Callable[[ChatStream], bool], reason: str) -> None:
        for stream in list(self._chats.values()):
            if not stream.over and which(stream):
                stream.end(ChatLost(stream.chat_id, reason))

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
        stream.offer(chunk.index, CHUNKS_END if chunk.done else piece_of(chunk))

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
                elif stream.emitter is not None and stream.watched_since is not None and not stream.over:
                    last = max(self._beats.get(stream.emitter, 0.0), stream.watched_since, back_at)
                    if now - last > self.liveness_timeout:
                        silent = f"runner {stream.emitter} sent no heartbeat for {now - last:.1f} s (it is gone)"
                        stream.end(ChatLost(stream.chat_id, silent))


async def _unsubscribe(sub: Follower | Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as err:  # a closed connection has nothing left to unsubscribe
        logger.bind(component="chat").debug(f"unsubscribe: {err!r}")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.bind(component="chat").opt(exception=task.exception()).error("background publish failed")
