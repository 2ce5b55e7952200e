"""What the runner's decisions ask of the world, and the driver that does it with asyncio.

The runner decides without I/O (`runner/handling.py`, `transitions.py`, `write_chain.py`):
each decision is a generator that yields one of these steps and is resumed with its
answer, or has the step's exception thrown into it, exactly where asyncio code would
`await`. `runner/task_loop.py` does the steps with NATS, the engine and the models dir;
`sim/runner.py` with the simulated log, consumer and disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from exojet.bus.envelope import Envelope
from exojet.bus.tasks import Task
from exojet.runner.write_chain import Build, LastOn

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Write:
    """Write one event on the runner's subject through the current chain; resumes with its
    stream sequence, or raises `Fenced`."""

    build: Build


@dataclass(frozen=True, slots=True)
class AckFloor:
    """The stream sequence up to which this runner's task consumer acknowledged everything."""


@dataclass(frozen=True, slots=True)
class ReadSubject:
    """The runner's own subject from `start_seq` to its current end; resumes with the envelopes."""

    start_seq: int


@dataclass(frozen=True, slots=True)
class HeartbeatSeen:
    """Whether another process heartbeats under this runner id (a twin); resumes with a bool."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the runner's holdings say against `task` (a LoadModel of a model not on disk):
    resumes with (error_type, message), or None to run it."""

    task: Task


@dataclass(frozen=True, slots=True)
class Work:
    """Do the task's work (a chat's answer); resumes with its result, or raises the task's
    error, or `DeadlinePassed`."""

    task: Task
    task_id: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """Wait until a chat's closing chunks are stored (they were sent while its status was written)."""


@dataclass(frozen=True, slots=True)
class Settle:
    """After a task was cut at its deadline: True if the engine serves on, else it is stopped."""

    task: Task


@dataclass(frozen=True, slots=True)
class StopEngine:
    """End the engine child (and the group that lived in it)."""


@dataclass(frozen=True, slots=True)
class Forget:
    """Hold nothing (no engine, no model downloaded), as a new incarnation after a loss."""


@dataclass(frozen=True, slots=True)
class Rejoined:
    """The runner registered again after a loss: it is no longer declared lost."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge the task message (it is never delivered again)."""


@dataclass(frozen=True, slots=True)
class Term:
    """Terminate the task message (poison: never delivered again)."""


@dataclass(frozen=True, slots=True)
class Say:
    """A line for the runner's log; `kind` names it for the simulation's tally of recoveries."""

    level: Literal["debug", "info", "warning", "error"]
    text: str
    binds: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    # Logged with its traceback (a bug of ours).
    error: BaseException | None = None


class DeadlinePassed(Exception):
    """The work ran past the task's deadline and was cut."""

    def __init__(self, seconds: float, shared: bool = False) -> None:
        # A chat's deadline counts its share of the engine's time (runner/shared_deadlines.py).
        share = " of its share of the engine's time" if shared else ""
        super().__init__(f"passed its deadline of {seconds:.0f} s{share}")
        self.seconds = seconds


Step = (Write | AckFloor | ReadSubject | HeartbeatSeen | LastOn | Refusal | Work | Delivered | Settle | StopEngine) | (
    Forget | Rejoined | Ack | Term | Say
)
Steps = Generator[Step, Any, _T]

# A read of the runner's own subject, as the driver answers `ReadSubject`.
Envelopes = list[Envelope]


async def drive(steps: Generator[Any, Any, _T], do: Callable[[Any], Awaitable[Any]]) -> _T:
    """Run `steps` to its end, doing each step with `do`: its answer is sent back in, its
    exception (a cancellation too) thrown in where the step was yielded."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            value: _T = done.value
            return value
        try:
            answer, error = await do(step), None
        except BaseException as err:  # noqa: BLE001 - handed to the generator, which raises what it does not handle
            answer, error = None, err
