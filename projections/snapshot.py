"""Snapshots: `{seq, state}` as zlib-compressed JSON, so a restart folds only what came after.

Compressed because a busy cluster's state is tens of MB of JSON (tens of
thousands of tasks) and a KV value must fit in one NATS message; JSON of this
shape shrinks about tenfold at the fastest level.
"""

from __future__ import annotations

import zlib

import msgspec

from exojet.projections.state import ClusterState


class SnapshotError(ValueError):
    """The bytes are not a snapshot this version can read."""


# The shape of `ClusterState` a snapshot holds; a snapshot of another shape is not read (the
# log is folded from its start instead). 2: a runner's `running_tasks` and `chat_capacity`.
# 3: a runner's `capabilities` (a snapshot without them would send it no chat needing one).
# 4: an instance's `failed_unready` (the retry limit's count; without it a supervisor from a
# snapshot and one from the log's start would decide a failure differently).
SHAPE = 4


class Snapshot(msgspec.Struct):
    seq: int
    state: ClusterState
    # Absent in snapshots of the first shape, so they fail to decode.
    shape: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


def dump_snapshot(state: ClusterState) -> bytes:
    """The snapshot bytes of `state` (its own `seq` is the cut)."""
    return zlib.compress(_encoder.encode(Snapshot(seq=state.seq, state=state, shape=SHAPE)), level=1)


def load_snapshot(data: bytes) -> ClusterState:
    """The state of a snapshot (raises SnapshotError on a corrupt one)."""
    try:
        snapshot = _decoder.decode(zlib.decompress(data))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as err:
        raise SnapshotError(f"unreadable snapshot: {err}") from None
    if snapshot.shape != SHAPE:
        raise SnapshotError(f"a snapshot of state shape {snapshot.shape}, this version reads {SHAPE}")
    return snapshot.state
