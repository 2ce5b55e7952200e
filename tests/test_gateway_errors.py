"""How the API answers a chat that ended without an answer (api/gateway.py's `api_error`)."""

from __future__ import annotations

from exojet.api.gateway import api_error
from exojet.bus.chat_ends import INVALID_STATE, KV_CACHE_FULL, ChatUnfinished


def test_a_full_kv_cache_is_a_retryable_503_and_an_engine_fault_a_500() -> None:
    full = api_error(ChatUnfinished("c1", "Failed", KV_CACHE_FULL, "llama.cpp's KV cache of 16384 tokens is full"))
    assert (full.status, full.code, full.headers) == (503, "kv_cache_full", {"Retry-After": "1"})
    assert "16384 tokens" in full.message
    fault = api_error(ChatUnfinished("c2", "Failed", "EngineError", "boom"))
    assert (fault.status, fault.code) == (500, "EngineError")


def test_a_chat_its_runner_was_no_longer_ready_for_is_a_retryable_503() -> None:
    why = "ChatCompletion needs RunnerReady, runner is RunnerIdle"
    err = api_error(ChatUnfinished("c3", "Failed", INVALID_STATE, why))
    assert (err.status, err.code, err.headers) == (503, "runner_not_ready", {"Retry-After": "1"})
    assert why in err.message
