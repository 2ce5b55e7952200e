"""The page's load view: per runner, chats busy of its capacity, chats queued in its runner
queue, and its tokens a second over the last minutes (the series the page draws itself).

Tokens come from each chat's result when it ends (`completion_tokens`), spread over the time it
decoded (`engine_seconds` less `time_to_first_token`), so a long chat fills the seconds it ran,
not the second it ended in. Times are the log's server times (`Envelope.time`).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.ids import chat_id_of
from exojet.bus.results import ChatResult, result_as
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.bus.views import TaskView
from exojet.projections.chat_time import Moments, where_time_went
from exojet.projections.state import ClusterState
from exojet.projections.words import chats_busy

# The chart's span and resolution: five minutes in 5-second buckets.
WINDOW_S = 300
BUCKET_S = 5


class RunnerLoad(msgspec.Struct, frozen=True):
    runner_id: str
    # "3/16" (projections.words.chats_busy); empty while it holds no model.
    chats: str
    queued: int
    # Tokens a second in each bucket, oldest first, the newest ending at `now`.
    rates: list[float]
    # Tokens a second in the last whole bucket (the newest one is still filling).
    recent: float


class TokenRates:
    """Each runner's generated tokens in BUCKET_S buckets over the last WINDOW_S seconds."""

    def __init__(self) -> None:
        self._buckets: dict[str, dict[int, float]] = {}

    def add(self, runner_id: str, ended: float, result: dict[str, Any] | None) -> None:
        """A chat that ended at `ended` (server time) with `result` on `runner_id`."""
        chat = result_as(ChatResult, result)
        if chat is None or chat.completion_tokens <= 0 or not ended:
            return
        tokens = chat.completion_tokens
        decode = max(chat.engine_seconds - chat.time_to_first_token, 1e-3)
        start = ended - decode
        buckets = self._buckets.setdefault(runner_id, {})
        first, last = int(start // BUCKET_S), int(ended // BUCKET_S)
        for b in range(first, last + 1):
            overlap = min(ended, (b + 1) * BUCKET_S) - max(start, b * BUCKET_S)
            buckets[b] = buckets.get(b, 0.0) + tokens * max(overlap, 0.0) / decode
        oldest = last - WINDOW_S // BUCKET_S
        for b in [b for b in buckets if b < oldest]:
            del buckets[b]

    def series(self, runner_id: str, now: float) -> list[float]:
        """Tokens a second in each bucket of the window ending at `now`, oldest first."""
        buckets = self._buckets.get(runner_id, {})
        last = math.floor(now / BUCKET_S)
        return [round(buckets.get(b, 0.0) / BUCKET_S, 2) for b in range(last - WINDOW_S // BUCKET_S + 1, last + 1)]


def chats_queued(state: ClusterState) -> dict[str, int]:
    """Per runner: chat tasks sent to it and not running yet."""
    queued = dict.fromkeys(state.runners, 0)
    for task_id in state.unfinished:
        task = state.tasks.get(task_id)
        if task is not None and task.task_type == "ChatCompletion" and task.status == TaskStatus.PENDING:
            queued[task.runner_id] = queued.get(task.runner_id, 0) + 1
    return queued


def runner_loads(state: ClusterState, rates: TokenRates, now: float) -> list[RunnerLoad]:
    """Every runner's load, by id."""
    queued = chats_queued(state)
    return [
        RunnerLoad(
            runner_id=r.runner_id,
            chats=chats_busy(r),
            queued=queued.get(r.runner_id, 0),
            rates=(series := rates.series(r.runner_id, now)),
            recent=series[-2],
        )
        for r in sorted(state.runners.values(), key=lambda r: r.runner_id)
    ]


# Chats whose moments are kept for their task rows (the page shows the newest 20 tasks).
KEPT_CHATS = 1000


class LoadView:
    """What the page's fold adds for the load view: token rates, and when each chat was asked,
    routed and started (server times: not state, so not in the projection)."""

    def __init__(self) -> None:
        self.rates = TokenRates()
        self._asked: dict[str, float] = {}
        self._moments: dict[str, Moments] = {}

    def observe(self, state: ClusterState, env: Envelope, message: object) -> None:
        """`env` was just folded into `state` (`message`: what it decoded to)."""
        match message:
            case RouteChatCompletion(command_id=command_id):
                _keep(self._asked, chat_id_of(command_id, env.seq), env.time)
            case ChatCompletion(task_id=str(task_id), stream_id=str(chat_id)):
                _keep(self._moments, task_id, Moments(asked=self._asked.pop(chat_id, 0.0), routed=env.time))
            case TaskStatusUpdated(task_id=task_id, task_status=status) if task_id in self._moments:
                moments = self._moments[task_id]
                moments.started = moments.started or env.time
                task = state.tasks.get(task_id)
                if status == TaskStatus.COMPLETE and task is not None:
                    self.rates.add(task.runner_id, env.time, task.result)

    def task_time(self, task: TaskView | None) -> str:
        """Where a chat task's time went, for its row ("" for other tasks)."""
        moments = self._moments.get(task.task_id) if task is not None else None
        return where_time_went(moments, task.result) if task is not None and moments is not None else ""

    def loads(self, state: ClusterState, now: float) -> list[RunnerLoad]:
        return runner_loads(state, self.rates, now)


def _keep(kept: dict[str, Any], key: str, value: Any) -> None:
    kept[key] = value
    while len(kept) > KEPT_CHATS:
        del kept[next(iter(kept))]
