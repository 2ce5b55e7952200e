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


class Snapshot(msgspec.Struct):
    seq: int
    state: ClusterState


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


def dump_snapshot(state: ClusterState) -> bytes:
    """The snapshot bytes of `state` (its own `seq` is the cut)."""
    return zlib.compress(_encoder.encode(Snapshot(seq=state.seq, state=state)), level=1)


def load_snapshot(data: bytes) -> ClusterState:
    """The state of a snapshot (raises SnapshotError on a corrupt one)."""
    try:
        return _decoder.decode(zlib.decompress(data)).state
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as err:
        raise SnapshotError(f"unreadable snapshot: {err}") from None
