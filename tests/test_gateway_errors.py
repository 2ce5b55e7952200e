"""How the API answers a chat that ended without an answer (api/gateway.py's `api_error`)."""

from __future__ import annotations

from exojet.api.gateway import api_error
from exojet.bus.chat_ends import KV_CACHE_FULL, ChatUnfinished


def test_a_full_kv_cache_is_a_retryable_503_and_an_engine_fault_a_500() -> None:
    full = api_error(ChatUnfinished("c1", "Failed", KV_CACHE_FULL, "llama.cpp's KV cache of 16384 tokens is full"))
    assert (full.status, full.code, full.headers) == (503, "kv_cache_full", {"Retry-After": "1"})
    assert "16384 tokens" in full.message
    fault = api_error(ChatUnfinished("c2", "Failed", "EngineError", "boom"))
    assert (fault.status, fault.code) == (500, "EngineError")
