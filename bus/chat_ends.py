"""Every way a chat can end, as its reader (`bus/nats/chat_session.py`) reports it.

A completed chat ends with `Ended`; every other end is a `ChatError` naming why, in words
a person can act on. The API maps each to its HTTP status (api/gateway.py), the CLI prints it.
"""

from __future__ import annotations

import msgspec

from exojet.bus.results import ChatResult

# The runner's errors that refuse a chat before any work (the engine serves on as before): the
# request's fault, so the API answers them 400.
REQUEST_REFUSALS = frozenset({"ContextLengthExceeded", "InvalidRequest"})
# The runner's error for a chat its engine's shared KV cache had no room for (llama.cpp): the
# engine serves on, the runner stays as it was, and the API answers 503 with Retry-After.
KV_CACHE_FULL = "KVCacheFull"
# The runner's error for a task its status cannot take. For a chat: routed on a state a moment
# old (its runner lost and registered again, or unloading); the API answers 503 with Retry-After.
INVALID_STATE = "InvalidState"
# A supervisor's refusal (`ChatRefused.error_type`) of a chat asking for more answers (`n`) than
# any Ready instance of its model serves at once.
TOO_MANY_CHOICES = "TooManyChoices"
# A supervisor's refusal of a chat needing a capability no Ready instance of its model states.
CAPABILITY_MISSING = "CapabilityMissing"


class Ended(msgspec.Struct, frozen=True):
    """The emitting task's Complete status and its result."""

    result: ChatResult


class ChatError(Exception):
    """The chat ended without an answer: `chat_id` and why."""

    def __init__(self, chat_id: str, detail: str) -> None:
        super().__init__(f"{chat_id}: {detail}")
        self.chat_id = chat_id
        self.detail = detail


class ChatUnfinished(ChatError):
    """Its emitting task ended Failed, TimedOut or Cancelled (`status`), with the runner's error."""

    def __init__(self, chat_id: str, status: str, error_type: str | None, error_message: str | None) -> None:
        super().__init__(chat_id, f"{status}: {error_type}: {error_message}")
        self.status = status
        self.error_type = error_type


class ChatQueueFull(ChatError):
    """A supervisor refused it (`ChatRefused`): every instance of its model is busy and its queue full."""


class ChatIncapable(ChatError):
    """A supervisor refused it (`ChatRefused`, `CapabilityMissing`): no Ready instance of its model
    states a capability it needs (bus/capabilities.py); the request's fault, as the runner's refusals."""


class ChatTooManyChoices(ChatError):
    """A supervisor refused it: it asks for more answers (`n`) than any instance serves at once."""


def refusal(chat_id: str, error_type: str, reason: str) -> ChatError:
    """The end of a chat a supervisor refused (`ChatRefused`)."""
    if error_type == TOO_MANY_CHOICES:
        return ChatTooManyChoices(chat_id, reason)
    if error_type == CAPABILITY_MISSING:
        return ChatIncapable(chat_id, f"{error_type}: {reason}")
    return ChatQueueFull(chat_id, f"{error_type}: {reason}")


class ChatLost(ChatError):
    """It cannot end by itself any more: its runner was lost or fell silent, its instance failed or was deleted."""


class ChatNotRouted(ChatError):
    """No supervisor routed it within the bound (none is up, or none answers)."""


class ChatCancelled(ChatError):
    """Cancelled before any rank of it ran."""
