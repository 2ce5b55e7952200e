"""Where a routed chat's first token went: the server's timestamps of its messages.

Every message a chat makes is stored with the time the server received it, on the same
clock as the client when both run on one host. For each chat this reads, from `EXO_LOG`
and `EXO_CHUNKS`: its command, its rank-0 task, that task's `Running`, the runner's
`RunnerRunning` after it, and the first chunk; with the client's start and first text
that cuts the first token into the hops it crossed. The hops sum to the first token.
"""

from __future__ import annotations

import statistics

import msgspec

from exojet.bus import subjects
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ids import chat_id_of, chat_task_id
from exojet.bus.nats import client
from exojet.bus.statuses import TaskStatus, status_name
from exojet.bus.streams import CHUNKS_STREAM
from exojet.bus.tasks import ChatCompletion
from exojet.projections.words import message_of

HOPS = (
    "client -> command stored",
    "routed: command -> task stored",
    "task -> its Running stored",
    "Running -> RunnerRunning stored",
    "engine: RunnerRunning -> first chunk stored",
    "first chunk stored -> client",
)


class Sent(msgspec.Struct, frozen=True):
    """One chat as its client saw it: its id and the wall-clock times it started and got text."""

    chat_id: str
    started: float
    first_text: float


class _Marks(msgspec.Struct):
    command: float = 0.0
    task: float = 0.0
    runner: str = ""
    running: float = 0.0
    runner_running: float = 0.0
    first_chunk: float = 0.0


async def chat_hops(nats_url: str, sent: list[Sent]) -> dict[str, float]:
    """Median seconds of each of `HOPS` over the chats in `sent` (those found whole in the log)."""
    marks = {s.chat_id: _Marks() for s in sent}
    by_task = {chat_task_id(chat_id, 0): m for chat_id, m in marks.items()}
    running_since: dict[str, list[_Marks]] = {}

    def on_log(env: Envelope) -> None:
        message = message_of(env)
        if isinstance(message, RouteChatCompletion):
            if (m := marks.get(chat_id_of(message.command_id, env.seq))) is not None:
                m.command = env.time
        elif isinstance(message, ChatCompletion) and message.task_id in by_task:
            m = by_task[message.task_id]
            m.task, m.runner = env.time, subjects.runner_of(env.subject) or ""
        elif isinstance(message, TaskStatusUpdated) and message.task_status == TaskStatus.RUNNING:
            if (m := by_task.get(message.task_id)) is not None and not m.running:
                m.running = env.time
                running_since.setdefault(m.runner, []).append(m)
        elif isinstance(message, RunnerStatusUpdated) and status_name(message.runner_status) == "RunnerRunning":
            waiting = running_since.get(subjects.runner_of(env.subject) or "", [])
            if waiting:
                waiting.pop(0).runner_running = env.time

    def on_chunk(env: Envelope) -> None:
        m = marks.get(subjects.chunks_stream_id(env.subject))
        if m is not None and not m.first_chunk:
            m.first_chunk = env.time

    nc = await client.connect(nats_url, name="bench-hops")
    try:
        await client.replay(nc, on_log)
        await client.replay(nc, on_chunk, stream=CHUNKS_STREAM)
    finally:
        await nc.close()
    cuts: list[list[float]] = [[] for _ in HOPS]
    for s in sent:
        m = marks[s.chat_id]
        points = (s.started, m.command, m.task, m.running, m.runner_running, m.first_chunk, s.first_text)
        if all(points):
            for i, hop in enumerate(cuts):
                hop.append(points[i + 1] - points[i])
    return {name: statistics.median(hop) for name, hop in zip(HOPS, cuts, strict=True) if hop}
