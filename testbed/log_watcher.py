"""Follow the log in a test and wait, with a bound, for the message you expect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_event, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import Event, RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.nats import client
from exojet.bus.nats.follower import Follower
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, status_name
from exojet.bus.tasks import Task
from exojet.projections.apply import apply
from exojet.projections.state import ClusterState

# What an entry of the log decodes to: a task, an event, or why it does not decode.
Message = Task | Event | BadInput
Entry = tuple[Envelope, Message]
Predicate = Callable[[ClusterState], bool]


class LogWatcher:
    """Everything in EXO_LOG, decoded, as it arrives; `wait_for` blocks until a match."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._changed = asyncio.Event()
        self._sub: Follower | None = None

    async def start(self, nc: NATS) -> LogWatcher:
        self._sub = await client.follow(nc, self._on)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def _on(self, env: Envelope) -> None:
        message: Message
        try:
            message = decode_task(env.data) if env.subject.startswith("exo.tasks.") else decode_event(env.data)
        except BadInput as err:
            message = err
        self.entries.append((env, message))
        self._changed.set()

    async def wait_for(self, match: Callable[[Message], bool], timeout: float = 30.0, after_seq: int = 0) -> Entry:
        """The first entry after `after_seq` whose message satisfies `match`."""
        async with asyncio.timeout(timeout):
            checked = 0
            while True:
                for env, message in self.entries[checked:]:
                    if env.seq > after_seq and match(message):
                        return env, message
                checked = len(self.entries)
                self._changed.clear()
                await self._changed.wait()

    async def task_done(self, task_id: str, timeout: float = 30.0) -> TaskStatusUpdated:
        """The terminal TaskStatusUpdated of `task_id`."""
        _, event = await self.wait_for(
            lambda m: (
                isinstance(m, TaskStatusUpdated) and m.task_id == task_id and m.task_status in TERMINAL_TASK_STATUSES
            ),
            timeout,
        )
        assert isinstance(event, TaskStatusUpdated)
        return event

    async def status(self, runner_id: str, name: str, timeout: float = 30.0, after_seq: int = 0) -> Entry:
        """The next RunnerStatusUpdated of `runner_id` to status `name` (e.g. "RunnerReady")."""
        return await self.wait_for(
            lambda m: (
                isinstance(m, RunnerStatusUpdated) and m.runner_id == runner_id and status_name(m.runner_status) == name
            ),
            timeout,
            after_seq,
        )

    def runner_events(self, runner_id: str, after_seq: int = 0) -> list[Message]:
        subject = f"exo.events.runner.{runner_id}"
        return [m for env, m in self.entries if env.subject == subject and env.seq > after_seq]


class LogWatch:
    """The log as it grows, folded locally; `until` waits for a condition on it."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.envs: list[Envelope] = []
        self.hooks: list[Callable[[Envelope], None]] = []
        self._changed = asyncio.Event()

    async def start(self, nc: NATS) -> None:
        self._sub = await client.follow(nc, self._on)

    def _on(self, env: Envelope) -> None:
        self.envs.append(env)
        self.state = apply(self.state, env)
        for hook in self.hooks:
            hook(env)
        self._changed.set()

    async def until(self, predicate: Predicate, timeout: float, what: str) -> ClusterState:
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.state):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not within {timeout} s: {what} (log at seq {self.state.seq})") from None
        return self.state

    def supervisor_writes(self) -> int:
        """Messages a supervisor wrote: instance tasks and supervisor events."""
        return sum(
            1
            for e in self.envs
            if e.subject == subjects.SUPERVISOR_EVENTS
            or (e.subject.startswith("exo.tasks.") and b'"instance_id":"inst-' in e.data)
        )
