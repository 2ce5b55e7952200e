"""Where a chat's time went: waiting to be routed, in its runner's queue, prefill, decode.

The waits come from the log's server times (for people, never for state: `Envelope.time`), the
engine's part from the chat task's result (`time_to_first_token`, `engine_seconds`).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class Moments(msgspec.Struct, kw_only=True):
    """Server times of a chat's steps in the log (0: not seen)."""

    asked: float = 0.0
    routed: float = 0.0
    started: float = 0.0


def _seconds(result: Mapping[str, object], key: str) -> float | None:
    value = result.get(key)
    return float(value) if isinstance(value, int | float) else None


def where_time_went(moments: Moments, result: Mapping[str, object] | None) -> str:
    """E.g. "0.01 s to be routed, 0.42 s in its runner's queue, prefill 0.12 s (57 prompt tokens),
    decode 2.31 s (96 tokens, 41.6 tokens/s)"; "" when nothing is known yet."""
    parts: list[str] = []
    if moments.asked and moments.routed:
        parts.append(f"{moments.routed - moments.asked:.2f} s to be routed")
    if moments.routed and moments.started:
        parts.append(f"{moments.started - moments.routed:.2f} s in its runner's queue")
    prefill = _seconds(result or {}, "time_to_first_token")
    engine = _seconds(result or {}, "engine_seconds")
    if result and prefill is not None and engine is not None:
        parts.append(f"prefill {prefill:.2f} s ({result.get('prompt_tokens', '?')} prompt tokens)")
        parts.append(
            f"decode {max(0.0, engine - prefill):.2f} s ({result.get('completion_tokens', '?')} tokens, "
            f"{result.get('tokens_per_second', '?')} tokens/s)"
        )
    return ", ".join(parts)
