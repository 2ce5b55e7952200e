"""Subject names: the one place that spells them."""

from __future__ import annotations

import re

TASKS_PREFIX = "exo.tasks"
RUNNER_EVENTS_PREFIX = "exo.events.runner"
SUPERVISOR_EVENTS = "exo.events.supervisor"
COMMANDS = "exo.commands"
CHUNKS_PREFIX = "exo.chunks"
HEARTBEAT_PREFIX = "exo.heartbeat"
HEARTBEATS = f"{HEARTBEAT_PREFIX}.*"
# Cancels go beside a runner's task queue, not into it: the queue is serial, so a
# cancel queued behind the chat it names would arrive after that chat ended.
CANCEL_PREFIX = "exo.cancel"

LOG_SUBJECTS = ("exo.tasks.>", "exo.events.>", COMMANDS, f"{CANCEL_PREFIX}.>")
CHUNK_SUBJECTS = (f"{CHUNKS_PREFIX}.>",)

QUERY_PREFIX = "exo.supervisor"
QUERY_STATE = f"{QUERY_PREFIX}.state"
QUERY_RUNNER = f"{QUERY_PREFIX}.runner"
QUERY_TASK = f"{QUERY_PREFIX}.task"
QUERY_INSTANCE = f"{QUERY_PREFIX}.instance"

# One subject token: no dots, spaces or wildcards, so an id can never address
# another runner's subject.
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


# Dot-separated tokens: a chat's chunks subject ends with its stream id.
_STREAM_ID = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def stream_id_problem(value: str) -> str | None:
    """None if `value` can end a chunks subject, else why not."""
    if len(value) <= 200 and _STREAM_ID.match(value):
        return None
    return f"{value[:80]!r} must be up to 200 letters, digits, '-', '_' and single dots (it ends a NATS subject)"


def id_problem(value: object, what: str = "runner id") -> str | None:
    """None if `value` can be one subject token, else why not."""
    if isinstance(value, str) and _TOKEN.match(value):
        return None
    return f"{what} {value!r} must be 1-64 letters, digits, '-' or '_'"


def task_subject(runner_id: str) -> str:
    return f"{TASKS_PREFIX}.{runner_id}"


def runner_events_subject(runner_id: str) -> str:
    return f"{RUNNER_EVENTS_PREFIX}.{runner_id}"


def chunks_subject(runner_id: str, stream_id: str) -> str:
    """Where `runner_id` streams the chunks of `stream_id`: under its own id, so its key
    can write only the chunks of its own tasks (older chunks, on `exo.chunks.<stream_id>`,
    expire with EXO_CHUNKS' max age; their payload is unchanged)."""
    return f"{CHUNKS_PREFIX}.{runner_id}.{stream_id}"


def chunks_filter(stream_id: str) -> str:
    """Every runner's chunks of `stream_id` (a routed chat's reader does not know the runner)."""
    return f"{CHUNKS_PREFIX}.*.{stream_id}"


def chunks_stream_id(subject: str) -> str:
    """The stream id of a chunks subject `exo.chunks.<runner_id>.<stream_id>` (it may hold dots)."""
    return subject.split(".", 3)[-1]


def runner_chunks(runner_id: str) -> str:
    """All chunks `runner_id` may write."""
    return f"{CHUNKS_PREFIX}.{runner_id}.>"


def heartbeat_subject(runner_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{runner_id}"


def cancel_subject(runner_id: str) -> str:
    return f"{CANCEL_PREFIX}.{runner_id}"


def runner_of(subject: str) -> str | None:
    """The runner id in a task, runner-event, heartbeat or cancel subject, else None."""
    for prefix in (TASKS_PREFIX, RUNNER_EVENTS_PREFIX, HEARTBEAT_PREFIX, CANCEL_PREFIX):
        if subject.startswith(prefix + "."):
            return subject[len(prefix) + 1 :]
    return None
