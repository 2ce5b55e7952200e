"""A message as it sits in the log: its stream sequence, subject and raw bytes."""

from __future__ import annotations

import msgspec


class Envelope(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    data: bytes
    # Server receive time, seconds since the epoch; for people, never for state.
    time: float = 0.0
