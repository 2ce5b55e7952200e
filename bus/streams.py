"""The streams, consumer and KV bucket exojet uses: names, limits and settings (DESIGN.md's Streams table).

`bus/nats/stream_setup.py` creates them on a server."""

from __future__ import annotations

import msgspec

LOG_STREAM = "EXO_LOG"
CHUNKS_STREAM = "EXO_CHUNKS"
SNAPSHOT_BUCKET = "EXO_SNAPSHOTS"
STREAM_NAMES = (LOG_STREAM, CHUNKS_STREAM, f"KV_{SNAPSHOT_BUCKET}")

DUPLICATE_WINDOW_S = 120.0
CHUNKS_MAX_AGE_S = 3600.0
# EXO_LOG's limits by default: what a laptop holds. The oldest messages go first;
# snapshots (stored at least every `--snapshot-every` messages) keep a rebuild
# possible, and `exojet log export` keeps history where users want it.
LOG_MAX_AGE_S = 30 * 24 * 3600.0
LOG_MAX_BYTES = 2 * 1024**3
TASK_MAX_DELIVER = 5
# Task messages a runner may hold unacknowledged (its chats in flight and the task after them).
TASK_MAX_ACK_PENDING = 64
# Short, so that a runner restarted after a crash gets the task its previous
# incarnation held (to answer it) within seconds; a live runner extends it with
# in-progress acks while it works.
TASK_ACK_WAIT_S = 6.0
# Replicas of what exojet creates on a cluster.
CLUSTER_REPLICAS = 3


class LogLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How much of `EXO_LOG` the server keeps (0: no limit)."""

    max_age_s: float = LOG_MAX_AGE_S
    max_bytes: int = LOG_MAX_BYTES


def task_consumer_name(runner_id: str) -> str:
    """The durable consumer a runner reads its tasks through (also what its permissions allow)."""
    return f"runner-{runner_id}"
