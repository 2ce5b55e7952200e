"""Where a chat's time went: waiting to be routed, in its runner's queue, prefill, decode.

The waits come from the log's server times (for people, never for state: `Envelope.time`), the
engine's part from the chat task's result (`time_to_first_token`, `engine_seconds`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from exojet.bus.results import ChatResult, result_as


class Moments(msgspec.Struct, kw_only=True):
    """Server times of a chat's steps in the log (0: not seen)."""

    asked: float = 0.0
    routed: float = 0.0
    started: float = 0.0


def where_time_went(moments: Moments, result: dict[str, Any] | None) -> str:
    """E.g. "0.01 s to be routed, 0.42 s in its runner's queue, prefill 0.12 s (57 prompt tokens),
    decode 2.31 s (96 tokens, 41.6 tokens/s)"; "" when nothing is known yet."""
    parts: list[str] = []
    if moments.asked and moments.routed:
        parts.append(f"{moments.routed - moments.asked:.2f} s to be routed")
    if moments.routed and moments.started:
        parts.append(f"{moments.started - moments.routed:.2f} s in its runner's queue")
    chat = result_as(ChatResult, result)
    if chat is not None and chat.engine_seconds:
        tokens = f"{chat.completion_tokens} tokens, {chat.tokens_per_second} tokens/s"
        if chat.time_to_first_token:
            parts.append(f"prefill {chat.time_to_first_token:.2f} s ({chat.prompt_tokens} prompt tokens)")
            parts.append(f"decode {max(0.0, chat.engine_seconds - chat.time_to_first_token):.2f} s ({tokens})")
        else:  # a result written before the prefill was reported apart
            parts.append(f"in the engine {chat.engine_seconds:.2f} s ({chat.prompt_tokens} prompt tokens, {tokens})")
    return ", ".join(parts)
