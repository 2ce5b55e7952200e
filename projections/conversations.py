"""Which runner holds which conversation's cache, so the router can send a conversation's next
turn where its earlier turns were computed: that runner's engine then prefills only the new
messages (llama.cpp's slot prompt cache; the next turn's history is the last turn's prompt plus
its answer and a new question).

A chat's messages are named by a chain of hashes (each over the one before and one message), so
every prefix of a chat has a name of its own, computed without I/O by the fold and the planner
alike. A runner keeps the names of the last chats it was given, a bounded list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from exojet.bus.tasks import ChatMessage
from exojet.bus.views import RunnerView

# Chats remembered per runner: more than its slots (16) by far, a few kilobytes of state.
KEPT_PER_RUNNER = 64


def prefix_names(messages: Sequence[ChatMessage]) -> list[str]:
    """The name of each prefix of `messages`: element k names messages[: k + 1]."""
    names: list[str] = []
    chained = b""
    for message in messages:
        chained = hashlib.blake2b(chained + msgspec.msgpack.encode(message), digest_size=12).digest()
        names.append(chained.hex())
    return names


def remember(runner: RunnerView, messages: Sequence[ChatMessage]) -> None:
    """`runner` was given a chat of `messages`: its engine will hold their cache for a while."""
    name = prefix_names(messages)[-1]
    runner.conversations = [*(n for n in runner.conversations if n != name), name][-KEPT_PER_RUNNER:]


def reused_messages(runner: RunnerView, names: Sequence[str]) -> int:
    """How many leading messages of a chat named `names` (prefix_names) `runner` was given before
    as a whole chat: the longest earlier turn it can continue; 0 for none. The chat's own whole
    list does not count (that is a repeat, not a continuation)."""
    held = set(runner.conversations)
    return next((k for k in range(len(names) - 1, 0, -1) if names[k - 1] in held), 0)
