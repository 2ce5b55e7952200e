"""Every task's deadline, counted from the moment the runner starts it.

Not from its publication: a queue behind a long task never times out by itself.
A chat's deadline grows with its size (its prompt and `max_tokens`), the others
are fixed per task type; `exojet runner --deadline TYPE=SECONDS` changes any of them.
Chats side by side share one engine's steps, so a chat's deadline is counted in its share of
the engine's time (`Shares`), not in wall time: 32 chats at once each take about 32 times as
long as one alone, and none of them is stuck.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from exojet.bus.lifecycle import LIFECYCLE
from exojet.bus.sampling import sampling_of
from exojet.bus.tasks import ChatCompletion, Task, task_type

# Generous for the slowest machine we run on (a CPU): a deadline is there to end
# what is stuck, never to cut a healthy task short.
DEFAULT_DEADLINES_S: dict[str, float] = {
    "DownloadModel": 6 * 3600.0,
    "ConnectToGroup": 120.0,
    "LoadModel": 1800.0,
    "StartWarmup": 600.0,
    "UnloadModel": 120.0,
    "Shutdown": 120.0,
    # A chat's base: what it may take before its first token, plus per-size terms below.
    "ChatCompletion": 60.0,
}
CHAT_SECONDS_PER_TOKEN = 0.5
CHAT_SECONDS_PER_PROMPT_KCHAR = 0.5
# How long chats in flight may run on once a Shutdown or an UnloadModel is next.
CHAT_GRACE_S = 30.0


@dataclass(frozen=True)
class Shares:
    """An engine's time as each of its chats sees it ("virtual time", as in processor sharing):
    while n chats are in flight, each is given 1/n of the wall clock. `virtual` is the time
    given to every chat in flight since the engine started, as of the wall time `wall`."""

    virtual: float = 0.0
    wall: float = 0.0
    sharing: int = 0

    def at(self, wall: float) -> float:
        """The virtual time at `wall` (not before `self.wall`)."""
        return self.virtual + (wall - self.wall) / max(self.sharing, 1)

    def sharing_now(self, sharing: int, wall: float) -> Shares:
        """From `wall` on, `sharing` chats share the engine."""
        return Shares(self.at(wall), wall, sharing)

    def wall_when(self, virtual: float) -> float:
        """The wall time the virtual time reaches `virtual`, if the sharing stays as it is."""
        return self.wall + (virtual - self.virtual) * max(self.sharing, 1)


class BadDeadline(ValueError):
    """A `--deadline` that is not `TYPE=SECONDS` for a task type."""


@dataclass(frozen=True)
class Deadlines:
    """Seconds per task type; a chat's base plus its size's share."""

    by_type: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADLINES_S))
    chat_seconds_per_token: float = CHAT_SECONDS_PER_TOKEN
    chat_seconds_per_prompt_kchar: float = CHAT_SECONDS_PER_PROMPT_KCHAR

    def for_task(self, task: Task) -> float:
        """How long the runner lets `task` run."""
        base = self.by_type[task_type(task)]
        if not isinstance(task, ChatCompletion):
            return base
        prompt_chars = sum(len(m.content) for m in task.messages)
        tokens = sampling_of(task).answer_length
        return base + tokens * self.chat_seconds_per_token + prompt_chars / 1000 * self.chat_seconds_per_prompt_kchar

    @classmethod
    def parse(cls, specs: Iterable[str], chat_seconds_per_token: float = CHAT_SECONDS_PER_TOKEN) -> Deadlines:
        """From `TYPE=SECONDS` items (the defaults for the types not named)."""
        by_type = dict(DEFAULT_DEADLINES_S)
        for spec in specs:
            kind, sep, value = spec.partition("=")
            if not sep or kind not in LIFECYCLE:
                raise BadDeadline(f"--deadline {spec!r}: want TYPE=SECONDS with TYPE one of {', '.join(LIFECYCLE)}")
            try:
                seconds = float(value)
            except ValueError:
                raise BadDeadline(f"--deadline {spec!r}: {value!r} is not a number of seconds") from None
            if not seconds > 0:
                raise BadDeadline(f"--deadline {spec!r}: a deadline must be positive")
            by_type[kind] = seconds
        return cls(by_type=by_type, chat_seconds_per_token=chat_seconds_per_token)
