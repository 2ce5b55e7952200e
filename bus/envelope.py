"""A message as it sits in the log: its stream sequence, subject and raw bytes."""

from __future__ import annotations

import msgspec


class Envelope(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    data: bytes
    # Server receive time, seconds since the epoch; for people, never for state.
    time: float = 0.0


def parse_ack_reply(reply: str) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, server time in ns) from a JetStream
    message's reply subject.

    Read directly: msg.metadata builds several objects per message, and a
    replay's speed is bounded by per-message work. The old form has 9 tokens,
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`; the
    new one adds `<domain>.<account hash>` after ACK and a trailing token.
    """
    tokens = reply.split(".")
    offset = 0 if len(tokens) == 9 else 2
    return int(tokens[5 + offset]), int(tokens[6 + offset]), int(tokens[7 + offset])
