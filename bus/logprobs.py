"""Token log-probabilities (`logprobs`, `top_logprobs`), declared once for the engine's replies,
the chunks and the API.

A token is its text and its log-probability; `raw` holds its bytes only when they are not its
text in UTF-8 (a token that is part of a character), so the common case costs no bytes on the
wire. The API renders OpenAI's `{token, logprob, bytes, top_logprobs}` from it.
"""

from __future__ import annotations

import msgspec


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One generated token (or one of the likeliest at its place, in `top`)."""

    token: str
    logprob: float
    # Its bytes, when they are not `token` in UTF-8 (None: they are).
    raw: bytes | None = None
    # The likeliest tokens at its place, most likely first (`top_logprobs` of them).
    top: tuple[TokenLogprob, ...] = ()

    def token_bytes(self) -> bytes:
        return self.raw if self.raw is not None else self.token.encode()


Logprobs = tuple[TokenLogprob, ...]
