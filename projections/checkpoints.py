"""In-memory checkpoints of a fold: its state every so many messages, small, restored exactly.

A state holds tens of thousands of entries (tasks, recent event ids, finished work) of
which a few hundred change between two checkpoints. So each large collection is cut into
segments at boundaries its own keys choose (a key whose mixed hash has `SEGMENT_BITS` zero
bits starts one: a key added or removed moves no other boundary), each segment encoded
(msgpack) and compressed once, and shared by every later checkpoint in which it is
unchanged. A restore joins the segments into one msgpack document and decodes it.

A segment is unchanged when it holds the same keys and the same values: the same
objects, none of which says it changed since (`updated_seq`, which the fold sets on every
task, routed chat, download and load it changes; not all of a runner's or an instance's do,
so those are encoded whole); values without an `updated_seq` are never changed in place.
`tests/test_checkpoints.py` checks both on the simulation's logs.
"""

from __future__ import annotations

import itertools
import operator
import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from exojet.bus.views import DownloadView, LoadView, RoutedChatView, TaskView
from exojet.projections.state import ClusterState

SEGMENT_BITS = 6
# Mixes a hash's bits before the mask (wrapping in 64 bits): an id (an address) has its low bits zero.
_MIX = np.int64(0x9E3779B1)
# A collection this large or larger is kept in segments; smaller ones are encoded whole.
LARGE = 256
# Views the fold gives a new `updated_seq` whenever it changes them.
_MARKED = (TaskView, RoutedChatView, DownloadView, LoadView)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ClusterState)
_FIELDS = ClusterState.__struct_fields__
_KEYS = {name: _encoder.encode(name) for name in _FIELDS}


@dataclass(frozen=True, slots=True)
class Segmented:
    """A large collection: its size, and its segments (zlib of the msgpack of consecutive
    entries, without the collection's header), each shared by the checkpoints it is unchanged in."""

    is_dict: bool
    count: int
    segments: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    # Per field of ClusterState: its compressed msgpack, or its segments.
    fields: tuple[bytes | Segmented, ...]


@dataclass(frozen=True, slots=True)
class _Cut:
    """A segment of the newest checkpoint, with what it holds (to tell whether the next one may share it)."""

    keys: tuple[Any, ...]
    values: tuple[Any, ...]
    data: bytes


def _header(count: int, is_dict: bool) -> bytes:
    small, mid = (0x80, b"\xde") if is_dict else (0x90, b"\xdc")
    if count < 16:
        return bytes([small | count])
    if count < 1 << 16:
        return mid + count.to_bytes(2, "big")
    return (b"\xdf" if is_dict else b"\xdd") + count.to_bytes(4, "big")


def _without_header(data: bytes) -> bytes:
    first = data[0]
    if first < 0xA0:  # fixmap, fixarray
        return data[1:]
    return data[3:] if first in (0xDC, 0xDE) else data[5:]


def _segmentable(value: dict[Any, Any] | list[Any]) -> bool:
    """Whether a change to an entry of `value` shows: its views are of a kind whose every change
    sets `updated_seq` (a runner's does not: its last event's seq moves with every event)."""
    first = next(iter(value.values() if isinstance(value, dict) else value))
    return not hasattr(first, "updated_seq") or isinstance(first, _MARKED)


def _same(new: tuple[Any, ...], old: tuple[Any, ...], since: int) -> bool:
    """Whether `new` holds what `old` held at seq `since`."""
    # Equal scalars (an int, a str) need not be the same object; a view is compared to
    # itself, so a view changed in place is told by its updated_seq.
    if not all(map(operator.is_, new, old)) and new != old:
        return False
    if new and hasattr(new[0], "updated_seq"):
        return all(v.updated_seq <= since for v in new)
    return True


class Checkpoints:
    """The checkpoints of one fold, oldest first, and the segments of the newest to share."""

    def __init__(self, large: int = LARGE, segment_bits: int = SEGMENT_BITS) -> None:
        self.large = large
        self.mask = np.int64((1 << segment_bits) - 1)
        self.checkpoints: list[Checkpoint] = []
        # Bytes the checkpoints hold, each shared segment counted once.
        self.held = 0
        # Per field: the newest checkpoint's segments by their first key.
        self._previous: dict[str, dict[Any, _Cut]] = {}

    def add(self, state: ClusterState) -> Checkpoint:
        """Checkpoint `state` as it is now."""
        since = self.checkpoints[-1].seq if self.checkpoints else -1
        fields: list[bytes | Segmented] = []
        for name in _FIELDS:
            value = getattr(state, name)
            if isinstance(value, dict | list) and len(value) >= self.large and _segmentable(value):
                fields.append(self._segmented(name, value, since))
            else:
                self._previous.pop(name, None)
                fields.append(zlib.compress(_encoder.encode(value), 1))
        checkpoint = Checkpoint(state.seq, tuple(fields))
        self.held += _bytes(checkpoint, self.checkpoints[-1] if self.checkpoints else None)
        self.checkpoints.append(checkpoint)
        return checkpoint

    def drop_oldest(self) -> Checkpoint:
        """Forget the oldest checkpoint (and what it alone held)."""
        oldest = self.checkpoints.pop(0)
        self.held -= _bytes(oldest, self.checkpoints[0] if self.checkpoints else None)
        return oldest

    def _segmented(self, name: str, value: dict[Any, Any] | list[Any], since: int) -> Segmented:
        is_dict = isinstance(value, dict)
        # A list's entries are told apart by identity (its cuts hold them, so no id is reused).
        keys = list(value) if isinstance(value, dict) else list(map(id, value))
        values = list(value.values()) if isinstance(value, dict) else list(value)
        hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))
        bounds = np.flatnonzero(((hashes * _MIX) >> 32) & self.mask == 0)
        starts = [0, *bounds[bounds > 0].tolist(), len(keys)]
        previous = self._previous.get(name, {})
        cuts = []
        for start, end in itertools.pairwise(starts):
            cut_keys, cut_values = tuple(keys[start:end]), tuple(values[start:end])
            old = previous.get(cut_keys[0])
            if old is not None and old.keys == cut_keys and _same(cut_values, old.values, since):
                cuts.append(old)
                continue
            entries = dict(zip(cut_keys, cut_values, strict=True)) if is_dict else list(cut_values)
            data = zlib.compress(_without_header(_encoder.encode(entries)), 1)
            cuts.append(_Cut(cut_keys, cut_values, data))
        self._previous[name] = {cut.keys[0]: cut for cut in cuts}
        return Segmented(is_dict, len(keys), tuple(cut.data for cut in cuts))

    def before(self, seq: int) -> int | None:
        """The index of the newest checkpoint at or before `seq`."""
        low, high = 0, len(self.checkpoints)
        while low < high:
            mid = (low + high) // 2
            if self.checkpoints[mid].seq <= seq:
                low = mid + 1
            else:
                high = mid
        return low - 1 if low else None


def _bytes(checkpoint: Checkpoint, beside: Checkpoint | None) -> int:
    """The bytes `checkpoint` holds that `beside` (the one before or after it) does not share: a
    segment is shared by consecutive checkpoints only, as one replaced never comes back."""
    shared = set() if beside is None else {id(s) for f in beside.fields if isinstance(f, Segmented) for s in f.segments}
    total = 0
    for field in checkpoint.fields:
        if isinstance(field, bytes):
            total += len(field)
        else:
            total += 8 * len(field.segments) + sum(len(s) for s in field.segments if id(s) not in shared)
    return total


def restore(checkpoint: Checkpoint) -> ClusterState:
    """The state `checkpoint` was taken of, a new object of its own."""
    parts = [_header(len(_FIELDS), True)]
    for name, field in zip(_FIELDS, checkpoint.fields, strict=True):
        parts.append(_KEYS[name])
        if isinstance(field, bytes):
            parts.append(zlib.decompress(field))
        else:
            parts.append(_header(field.count, field.is_dict))
            parts.extend(map(zlib.decompress, field.segments))
    return _decoder.decode(b"".join(parts))
