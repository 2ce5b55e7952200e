"""How many chats an MLX model's batch serves at once (`runner.mlx_batch`), and the bytes of
earlier chats' KV caches it keeps: what memory allows.

Each chat's KV cache is counted at CHAT_WINDOW tokens (or the model's window, if shorter), in half
the memory left free once the weights are in, at most MAX_CHATS (mlx-lm's server decodes 32 at
once by default); the prompt cache gets a quarter of that free memory, at most 8 GiB (llama.cpp's
default).
"""

from __future__ import annotations

from typing import Any

import msgspec

# mlx-lm's server's default decode concurrency: beyond it a step's cost grows with the batch.
MAX_CHATS = 32
# The KV caches' share of the memory free after the weights are in (the rest: prompts being
# tokenized, MLX's buffer cache, other processes).
KV_MAX_FREE_FRACTION = 0.5
# A chat is counted at this many tokens of KV cache (or its model's window, if shorter), as
# llama.cpp's engine here gives each chat a window of 4,096 (`engine_llamacpp.MAX_CONTEXT`):
# counting a long-context model's whole window (128k tokens) would leave it one chat.
CHAT_WINDOW = 4096
# The prompt cache: chats kept (the router remembers each runner's last 64), its share of the
# memory free once the weights are in, and its bound (llama.cpp's default `cache_ram_mib`).
PROMPT_CACHE_CHATS = 64
PROMPT_CACHE_SHARE = 0.25
PROMPT_CACHE_MAX_BYTES = 8 << 30


class Capacity(msgspec.Struct, frozen=True):
    """Chats served at once, the bytes of earlier chats' caches kept, and why."""

    chats: int
    reason: str
    prompt_cache_bytes: int = 0


def chat_capacity(free_bytes: int, kv_bytes_per_token: int, window: int | None) -> Capacity:
    """How many chats fit in memory, each counted at CHAT_WINDOW tokens or its model's
    `window` (None: unknown), whichever is shorter."""
    tokens = min(window or CHAT_WINDOW, CHAT_WINDOW)
    per_chat = max(1, kv_bytes_per_token * tokens)
    budget = int(free_bytes * KV_MAX_FREE_FRACTION)
    chats = max(1, min(MAX_CHATS, budget // per_chat))
    kept = min(int(free_bytes * PROMPT_CACHE_SHARE), PROMPT_CACHE_MAX_BYTES)
    return Capacity(
        chats,
        f"{chats} chats of up to {tokens} tokens ({per_chat / 1e6:.0f} MB of KV cache each) "
        f"in {KV_MAX_FREE_FRACTION:.0%} of {free_bytes / 1e6:.0f} MB free, at most {MAX_CHATS}; "
        f"earlier chats' caches kept in {kept / 1e6:.0f} MB",
        kept,
    )


def kv_bytes_per_token(model: Any) -> int | None:
    """The KV cache bytes one token of one chat takes on `model` (measured on one token);
    None if its caches cannot be batched (mlx-lm merges only some cache types)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if not all(hasattr(c, "merge") for c in cache):
        return None
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    # A cache holds room for KVCache.step tokens once it holds one; a cache that does not grow
    # with the chat (a sliding window, a recurrent state) is so counted generously.
    per_token: int = max(1, -(-sum(c.nbytes for c in cache) // KVCache.step))
    return per_token
