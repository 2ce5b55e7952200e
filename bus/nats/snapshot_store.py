"""Snapshots in KV `EXO_SNAPSHOTS`, chunked so one is never too large to store.

A KV value is one NATS message (at most the server's `max_payload`), and a
snapshot must never be skipped for size: with a bounded log, the snapshot is
what a rebuild starts from. So the key `cluster` holds a small manifest
`{seq, chunks, size, sha256}` and the snapshot's bytes go in `cluster.<seq>.<i>`.
The chunks are written first and the manifest last, so a reader never sees a
manifest whose chunks are not there yet; each writer then purges the chunks of
the manifest it replaced. A reader that finds a chunk gone (a newer snapshot
replaced it meanwhile) or a digest that does not match reads the manifest again.
A value at `cluster` that is not a manifest is a snapshot of the older, unchunked
form and is read as it is.
"""

from __future__ import annotations

import hashlib

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

SNAPSHOT_KEY = "cluster"
# Room for the KV headers and subject inside max_payload.
_OVERHEAD = 4096
_READ_ATTEMPTS = 3


class SnapshotUnreadable(Exception):
    """The stored snapshot's chunks kept changing while read, or did not match their digest."""


class Manifest(msgspec.Struct, kw_only=True, tag="SnapshotManifest"):
    seq: int
    chunks: int
    size: int
    sha256: str


_manifest_decoder = msgspec.json.Decoder(Manifest)


def _chunk_key(seq: int, index: int) -> str:
    return f"{SNAPSHOT_KEY}.{seq}.{index}"


async def _manifest(kv: KeyValue) -> tuple[Manifest | None, bytes | None]:
    """(the manifest, None), or (None, a whole old-form snapshot), or (None, None) when there is none."""
    try:
        entry = await kv.get(SNAPSHOT_KEY)
    except KeyNotFoundError:
        return None, None
    value = entry.value or b""
    try:
        return _manifest_decoder.decode(value), None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, value


async def store_snapshot(kv: KeyValue, data: bytes, seq: int, max_payload: int) -> int:
    """Store snapshot bytes `data` (of `seq`) in chunks that fit `max_payload`; returns the chunk count."""
    previous, _ = await _manifest(kv)
    size = max(max_payload - _OVERHEAD, 1024)
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    for index, piece in enumerate(pieces):
        await kv.put(_chunk_key(seq, index), piece)
    manifest = Manifest(seq=seq, chunks=len(pieces), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    await kv.put(SNAPSHOT_KEY, msgspec.json.encode(manifest))
    if previous is not None and previous.seq != seq:
        for index in range(previous.chunks):
            try:
                await kv.purge(_chunk_key(previous.seq, index))
            except KeyNotFoundError:
                continue  # another supervisor purged it first
    return len(pieces)


async def load_snapshot_bytes(kv: KeyValue) -> bytes | None:
    """The newest snapshot's bytes, or None when none was stored (SnapshotUnreadable)."""
    for _ in range(_READ_ATTEMPTS):
        manifest, whole = await _manifest(kv)
        if manifest is None:
            return whole
        try:
            parts = [(await kv.get(_chunk_key(manifest.seq, i))).value or b"" for i in range(manifest.chunks)]
        except KeyNotFoundError:
            continue  # replaced while we read: read the new manifest
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() == manifest.sha256:
            return data
    raise SnapshotUnreadable(f"snapshot chunks kept changing or did not match their digest ({_READ_ATTEMPTS} reads)")
