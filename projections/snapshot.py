"""Snapshots: `{seq, state}` as JSON, so a restart folds only what came after."""

from __future__ import annotations

import msgspec

from projections.state import ClusterState


class Snapshot(msgspec.Struct):
    seq: int
    state: ClusterState


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


def dump_snapshot(state: ClusterState) -> bytes:
    """The snapshot bytes of `state` (its own `seq` is the cut)."""
    return _encoder.encode(Snapshot(seq=state.seq, state=state))


def load_snapshot(data: bytes) -> ClusterState:
    """The state of a snapshot (raises msgspec errors on a corrupt one)."""
    return _decoder.decode(data).state
