"""The OpenAI-compatible API through the official `openai` client, against a real stack.

One stack (nats-server, a supervisor, a runner with the tiny model Ready, `exojet api`
with a key) serves the whole module; each test asserts what a client relies on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import psutil
import pytest

from exojet.bus import subjects
from exojet.bus.nats import client
from exojet.runner.mlx_capacity import MAX_CHATS
from testbed.tiny_model import write_tiny_llama
from tests.api_stack import API_KEY, MODEL, ApiStack, cancels_in_log, start_stack, task_statuses

pytestmark = pytest.mark.timeout(180)

PROMPT = "Tell me about the capital of France"
CONCURRENT = 32
QUEUE = 40
LIVENESS_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    root = tmp_path_factory.mktemp("api")
    write_tiny_llama(root / "models" / "local--tiny")
    # A queue of 40 per instance beside its runner's MAX_CHATS in flight.
    s = start_stack(root, root / "models", max_queue=QUEUE)
    yield s
    s.close()


@pytest.fixture
def sync_client(stack: ApiStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def async_client(stack: ApiStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def _messages(prompt: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_models_lists_the_ready_model_and_retrieves_it(sync_client: openai.OpenAI) -> None:
    models = sync_client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "local"
    assert sync_client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sync_client.models.retrieve("local/not-placed")


def test_whole_and_streamed_answers_equal_exojet_chat(stack: ApiStack, sync_client: openai.OpenAI) -> None:
    expected = stack.cli("chat", PROMPT, "--model", MODEL, "--max-tokens", "24", "--temperature", "0")
    expected = expected.removesuffix("\n")  # `exojet chat` ends the answer with a newline
    whole = sync_client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=24, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24

    chunks = list(
        sync_client.chat.completions.create(
            model=MODEL,
            messages=_messages(),
            max_completion_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"] and chunks[-2].choices[0].finish_reason == "length"
    # include_usage: one more chunk, no choices, the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert all(c.id == chunks[0].id for c in chunks)


async def test_async_client_stop_and_length(async_client: openai.AsyncOpenAI) -> None:
    full = await async_client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert text is not None and len(text) > 8
    # A stop sequence from the middle of the answer: the answer ends just before it.
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = await async_client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=40, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    streamed = await async_client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=3, temperature=0, stream=True
    )
    reasons = [c.choices[0].finish_reason async for c in streamed if c.choices]
    assert reasons[-1] == "length"


def test_errors_are_openai_errors_with_the_right_status(stack: ApiStack, sync_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sync_client.chat.completions.create(model="local/unknown", messages=_messages())
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    bad_key = openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL, messages=_messages())
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError) as n_9:
        sync_client.chat.completions.create(model=MODEL, messages=_messages(), n=9)
    assert n_9.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as tools:
        sync_client.chat.completions.create(
            model=MODEL,
            messages=_messages(),
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            response_format={"type": "json_object"},
        )
    assert "tools" in tools.value.message and tools.value.body["code"] == "unsupported_parameter"  # type: ignore[index]

    api = f"http://127.0.0.1:{stack.port}"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in [
        ({"model": MODEL, "messages": [], "max_tokens": 3}, "messages"),
        ({"model": MODEL, "messages": _messages(), "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": MODEL, "messages": _messages(), "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": _messages(), "colour": "red"}, "colour"),
    ]:
        answer = httpx.post(f"{api}/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 400, answer.text  # never a framework's 422
        assert answer.json()["error"]["param"] == param
    assert httpx.post(f"{api}/v1/chat/completions", content=b"{not json", headers=auth).status_code == 400
    # /health needs no key; everything else does.
    assert httpx.get(f"{api}/health").json() == {"status": "ok", "nats": True}
    assert httpx.get(f"{api}/openapi.json").status_code == 401
    assert httpx.get(f"{api}/v1/nothing", headers=auth).json()["error"]["code"] == "not_found"
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 is refused.
    rebound = httpx.get(f"{api}/v1/models", headers={**auth, "Host": "evil.example:80"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    # No CORS unless asked for.
    preflight = httpx.options(
        f"{api}/v1/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ({"presence_penalty": 1}, "presence_penalty", "unsupported"),
        ({"verbosity": "low"}, "verbosity", "unsupported"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ],
)
def test_openai_parameter_rules_are_400s_naming_the_parameter(
    sync_client: openai.OpenAI, extra: dict[str, Any], param: str, code: str
) -> None:
    # As vLLM and llama.cpp's server check them, before any chat is routed.
    with pytest.raises(openai.BadRequestError) as err:
        sync_client.chat.completions.create(model=MODEL, messages=_messages(), **({"max_tokens": 2} | extra))
    assert (err.value.body["param"], err.value.body["code"]) == (param, code)  # type: ignore[index]


def test_no_op_parameters_are_answered_and_stream_options_elsewhere_need_stream(sync_client: openai.OpenAI) -> None:
    answer = sync_client.chat.completions.create(
        model=MODEL,
        messages=_messages(),
        max_tokens=2,
        safety_identifier="user-1",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        verbosity="medium",
        presence_penalty=0,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as completion:
        sync_client.completions.create(model=MODEL, prompt="hi", stream_options={"include_usage": True})
    assert completion.value.body["param"] == "stream_options"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as response:
        sync_client.responses.create(model=MODEL, input="hi", stream_options={"include_obfuscation": False})
    assert response.value.body["param"] == "stream_options"  # type: ignore[index]


async def test_32_concurrent_streams_all_complete_with_the_right_text(async_client: openai.AsyncOpenAI) -> None:
    prompts = [f"Count to {i} for me" for i in range(CONCURRENT)]
    expected = []
    for prompt in prompts:
        answer = await async_client.chat.completions.create(
            model=MODEL, messages=_messages(prompt), max_tokens=16, temperature=0
        )
        expected.append(answer.choices[0].message.content)

    async def stream(prompt: str) -> tuple[str, str | None]:
        chunks = await async_client.chat.completions.create(
            model=MODEL, messages=_messages(prompt), max_tokens=16, temperature=0, stream=True
        )
        parts, reason = [], None
        async for chunk in chunks:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    results = await asyncio.gather(*(stream(p) for p in prompts))
    assert [text for text, _ in results] == expected
    assert all(reason in ("stop", "length") for _, reason in results)


async def test_past_the_instance_queue_a_chat_gets_429_with_retry_after(
    stack: ApiStack, async_client: openai.AsyncOpenAI
) -> None:
    async def ask(i: int) -> str:
        try:
            answer = await async_client.chat.completions.create(
                model=MODEL, messages=_messages(f"story {i}"), max_tokens=4, temperature=0
            )
        except openai.RateLimitError as err:
            assert err.response.headers["retry-after"] == "1"
            assert err.body["code"] == "queue_full"  # type: ignore[index]
            return "429"
        assert answer.choices[0].finish_reason in ("stop", "length")
        return "ok"

    # The runner paused (well inside the liveness timeout): MLX's MAX_CHATS chats stay in
    # flight, 40 wait in its queue and the next is refused.
    runner = psutil.Process(stack.procs["r1"].pid)
    runner.suspend()
    try:
        asked = [asyncio.ensure_future(ask(i)) for i in range(MAX_CHATS + QUEUE + 1)]
        done, _ = await asyncio.wait(asked, timeout=3, return_when=asyncio.FIRST_COMPLETED)
    finally:
        runner.resume()
    assert [d.result() for d in done] == ["429"]
    outcomes = await asyncio.gather(*asked)
    assert outcomes.count("429") == 1 and outcomes.count("ok") == MAX_CHATS + QUEUE
    # The queue drained: the next chat is served again.
    again = await async_client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")


@pytest.fixture
def fragile_stack(tmp_path: Path, models_dir: Path) -> Iterator[ApiStack]:
    """A stack of its own, for a test that kills its runner (liveness timeout 2 s)."""
    s = start_stack(tmp_path, models_dir, heartbeat_timeout=LIVENESS_S)
    yield s
    s.close()


def test_a_runner_killed_mid_stream_ends_the_stream_with_an_error_not_a_hang(fragile_stack: ApiStack) -> None:
    api = openai.OpenAI(base_url=fragile_stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    stream = api.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=16_000, temperature=0, stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    next(chunks)  # generation is under way
    fragile_stack.procs["r1"].kill()
    killed = time.monotonic()
    with pytest.raises(openai.APIError) as ended:
        for _ in chunks:
            pass
    assert time.monotonic() - killed < LIVENESS_S + 3
    assert "r1" in ended.value.message and ended.value.body["code"] == "runner_lost"  # type: ignore[index]


async def _first_text(stream: openai.AsyncStream[Any]) -> str:
    """The chat id, once the stream has sent its role and some text (generation is under way)."""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return str(chunk.id)
    raise AssertionError("the stream ended before any text")


async def _served_again(api: openai.AsyncOpenAI) -> None:
    # The runner takes tasks in order: once this one completes, the one before it has ended.
    again = await api.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")


async def test_a_client_that_disconnects_cancels_its_chat(stack: ApiStack, async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=16_000, temperature=0, stream=True
    )
    chat_id = await _first_text(stream)
    await stream.close()
    await _served_again(async_client)
    statuses = await task_statuses(stack.url, "r1", f"{chat_id}.0")
    assert statuses == ["Running", "Cancelled client disconnected"]  # exactly one terminal status
    assert (f"{chat_id}.0", "client disconnected") in await cancels_in_log(stack.url, "r1")
    timeline = stack.cli("replay", "--task", f"{chat_id}.0")
    [cancel_line] = [line for line in timeline.splitlines() if "CancelTask" in line]
    assert "exo.cancel.r1" in cancel_line and f"cancel task {chat_id}.0" in cancel_line
    assert cancel_line.endswith(": client disconnected")


async def test_post_cancel_stops_a_stream_with_an_error_event(
    stack: ApiStack, async_client: openai.AsyncOpenAI
) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=16_000, temperature=0, stream=True
    )
    chat_id = await _first_text(stream)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        cancelled = await http.post(f"{stack.base_url}/cancel/{chat_id}")
        assert cancelled.status_code == 200 and cancelled.json()["tasks"] == [f"{chat_id}.0"]
        assert (await http.post(f"{stack.base_url}/cancel/chat-nothing")).status_code == 404
    with pytest.raises(openai.APIError) as ended:
        async for _ in stream:
            pass
    assert ended.value.body["code"] == "cancelled"  # type: ignore[index]
    await _served_again(async_client)
    assert await task_statuses(stack.url, "r1", f"{chat_id}.0") == [
        "Running",
        "Cancelled cancelled through POST /v1/cancel",
    ]


async def test_a_plain_cancel_message_stops_the_running_chat_and_one_sent_beside_it(
    stack: ApiStack, async_client: openai.AsyncOpenAI
) -> None:
    running = await async_client.chat.completions.create(
        model=MODEL, messages=_messages(), max_tokens=16_000, temperature=0, stream=True
    )
    running_id = await _first_text(running)
    nc = await client.connect(stack.url, name="test")
    try:
        # A chat sent straight to the runner's queue, as `nats pub exo.tasks.r1 '{...}'` does: it
        # may run beside the running one or wait for a slot; cancelled first, it never runs.
        queued = {
            "type": "ChatCompletion",
            "task_id": "queued-1",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16_000,
        }
        await nc.publish(subjects.task_subject("r1"), json.dumps(queued).encode())
        # What `nats pub exo.cancel.r1 '{...}'` sends: core NATS, plain JSON.
        for task_id in ("queued-1", f"{running_id}.0"):
            await nc.publish(subjects.cancel_subject("r1"), f'{{"type":"CancelTask","task_id":"{task_id}"}}'.encode())
        await nc.flush()
    finally:
        await nc.close()
    with pytest.raises(openai.APIError):
        async for _ in running:
            pass
    await _served_again(async_client)
    assert await task_statuses(stack.url, "r1", f"{running_id}.0") == ["Running", "Cancelled cancelled"]
    # Cancelled before the runner took it (it never ran), or once running.
    assert await task_statuses(stack.url, "r1", "queued-1") in (
        ["Cancelled cancelled"],
        ["Running", "Cancelled cancelled"],
    )
