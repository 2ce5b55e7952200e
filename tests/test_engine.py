"""The MLX engine in its child process, driven through `runner.engine.Engine`.

Everything is real: the child is `python -m exojet.runner.engine_child`, the model is the
tiny random llama, and the reference outputs come from mlx-lm in this process.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from exojet.runner.engine import Engine, EngineCrashed, EngineError
from exojet.runner.engine_protocol import Done, Generate, Message, Token
from exojet.runner.stop_scanner import StopScanner
from tests.tiny_model import write_tiny_llama

# The async tests share one event loop so they can share one engine child.
module_loop = pytest.mark.asyncio(loop_scope="module")

PROMPT = [Message(role="user", content="hello world, tell me a story")]
# Far more tokens than any test reads: only a cancel or a kill ends such a request.
ENDLESS = 1_000_000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> tuple[object, object]:
    from mlx_lm.utils import load

    return load(str(tiny_model))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[Engine]:
    """One child for the tests that do not crash it (each test loads its model)."""
    eng = Engine()
    await eng.start()
    yield eng
    await eng.stop()


def direct_deltas(reference: tuple[object, object], max_tokens: int) -> list[str]:
    """Greedy text deltas from mlx-lm's stream_generate in this process."""
    from mlx_lm import stream_generate

    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in PROMPT],
        add_generation_prompt=True,
    )
    return [r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens) if r.text]


async def collect(engine: Engine, req: Generate) -> tuple[list[str], Done]:
    chunks: list[str] = []
    async for reply in engine.generate(req):
        if isinstance(reply, Token):
            chunks.append(reply.text)
        else:
            return chunks, reply
    raise AssertionError("generation ended without Done")


@module_loop
@pytest.mark.timeout(60)
async def test_greedy_stream_matches_mlx_lm(engine: Engine, tiny_model: Path, reference) -> None:
    loaded = await engine.load(str(tiny_model))
    assert (loaded.n_layers, loaded.start_layer, loaded.end_layer) == (4, 0, 4)
    await engine.warmup()

    chunks, done = await collect(engine, Generate(messages=PROMPT, max_tokens=40))

    expected = direct_deltas(reference, max_tokens=40)
    assert chunks == expected
    assert len(chunks) > 5
    assert done.text == "".join(expected)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 40
    assert done.prompt_tokens > 0
    assert done.tokens_per_second > 0


@module_loop
@pytest.mark.timeout(60)
async def test_stop_string_truncates_the_stream(engine: Engine, tiny_model: Path, reference) -> None:
    await engine.load(str(tiny_model))
    full = "".join(direct_deltas(reference, max_tokens=40))
    # A stop string spanning several tokens, so it has to be held back while it forms.
    stop = full[len(full) // 3 : len(full) // 3 + 5]
    expected = full[: full.index(stop)]

    chunks, done = await collect(engine, Generate(messages=PROMPT, max_tokens=40, stop=["no such text", stop]))

    assert done.finish_reason == "stop"
    assert done.text == expected
    assert "".join(chunks) == expected
    assert done.completion_tokens < 40


@pytest.mark.timeout(60)
@given(
    text=st.text(alphabet="abc", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
)
def test_stop_scanner_never_sends_past_a_stop(text: str, cuts: list[int], stops: list[str]) -> None:
    # A generation stops where the first stop string completes.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(hits)[1]] if hits else text
    scanner = StopScanner(stops)
    sent = ""
    stopped = False
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        out, stopped = scanner.feed(text[a:b] if a < b else "")
        sent += out
        if stopped:
            break
    if not stopped:
        sent += scanner.flush()
    assert sent == expected
    assert stopped == bool(hits)


@module_loop
@pytest.mark.timeout(60)
async def test_same_seed_same_text(engine: Engine, tiny_model: Path) -> None:
    await engine.load(str(tiny_model))

    def sampled(seed: int) -> Generate:
        return Generate(messages=PROMPT, max_tokens=30, temperature=1.5, top_p=0.95, seed=seed)

    _, first = await collect(engine, sampled(7))
    _, again = await collect(engine, sampled(7))
    _, other = await collect(engine, sampled(8))
    _, greedy = await collect(engine, Generate(messages=PROMPT, max_tokens=30))

    assert first.text == again.text
    assert other.text != first.text
    assert greedy.text not in (first.text, other.text)


@module_loop
@pytest.mark.timeout(60)
async def test_load_errors_are_answers_and_the_engine_keeps_serving(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(EngineError) as err:
        await engine.load(str(missing))
    assert err.value.error_type == "ModelLoadError"
    assert f"could not load model from {missing}" in err.value.message

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match=f"could not load model from {corrupt}"):
        await engine.load(str(corrupt))

    with pytest.raises(EngineError) as err:
        await collect(engine, Generate(messages=PROMPT, max_tokens=4))
    assert err.value.error_type == "NotLoaded"

    await engine.load(str(tiny_model))
    _, done = await collect(engine, Generate(messages=PROMPT, max_tokens=4))
    assert done.completion_tokens == 4
    assert engine.alive


@module_loop
@pytest.mark.timeout(60)
async def test_shard_load_materialises_only_its_layers(engine: Engine, tiny_model: Path) -> None:
    whole = await engine.load(str(tiny_model))
    middle = await engine.load(str(tiny_model), start_layer=1, end_layer=3)

    assert (middle.start_layer, middle.end_layer, middle.n_layers) == (1, 3, 4)
    # Two of four layers, and neither the embeddings nor the head.
    assert 0 < middle.weight_bytes < whole.weight_bytes / 2

    with pytest.raises(EngineError) as err:
        await engine.load(str(tiny_model), start_layer=3, end_layer=9)
    assert err.value.error_type == "InvalidShard"


@module_loop
@pytest.mark.timeout(60)
async def test_abandoned_generation_is_cancelled(engine: Engine, tiny_model: Path, reference) -> None:
    await engine.load(str(tiny_model))
    stream = engine.generate(Generate(messages=PROMPT, max_tokens=ENDLESS))
    async for reply in stream:
        assert isinstance(reply, Token)
        break
    await stream.aclose()

    # Draining a million tokens would blow the timeout: the child must have stopped.
    chunks, done = await collect(engine, Generate(messages=PROMPT, max_tokens=10))
    assert chunks == direct_deltas(reference, max_tokens=10)
    assert done.finish_reason == "length"


@module_loop
@pytest.mark.timeout(60)
async def test_event_loop_stays_responsive_while_generating(engine: Engine, tiny_model: Path) -> None:
    await engine.load(str(tiny_model))
    ticks: list[float] = []
    gen_done = asyncio.Event()

    async def tick() -> None:
        while not gen_done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    _, done = await collect(engine, Generate(messages=PROMPT, max_tokens=300))
    gen_done.set()
    await ticker

    assert done.completion_tokens == 300
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 3
    assert max(gaps) < 0.25


@module_loop
@pytest.mark.timeout(60)
async def test_sigkill_during_generation_then_restart(tiny_model: Path, reference) -> None:
    eng = Engine()
    await eng.start()
    try:
        await eng.load(str(tiny_model))
        first_pid = eng.pid
        with pytest.raises(EngineCrashed) as crash:
            async for reply in eng.generate(Generate(messages=PROMPT, max_tokens=ENDLESS)):
                assert isinstance(reply, Token)
                os.kill(first_pid, signal.SIGKILL)
        assert "killed by SIGKILL" in str(crash.value)
        assert "engine child started" in str(crash.value)
        assert not eng.alive
        with pytest.raises(EngineCrashed, match="SIGKILL"):
            await eng.load(str(tiny_model))

        await eng.start()
        assert eng.alive and eng.pid != first_pid
        await eng.load(str(tiny_model))
        chunks, _ = await collect(eng, Generate(messages=PROMPT, max_tokens=8))
        assert chunks == direct_deltas(reference, max_tokens=8)
    finally:
        await eng.stop()


@module_loop
@pytest.mark.timeout(60)
async def test_segfault_is_reported_with_stderr(tiny_model: Path) -> None:
    eng = Engine()
    await eng.start()
    try:
        await eng.load(str(tiny_model))
        os.kill(eng.pid, signal.SIGSEGV)
        with pytest.raises(EngineCrashed) as crash:
            await eng.warmup()
        message = str(crash.value)
        assert "killed by SIGSEGV" in message
        assert "last stderr lines" in message
        # The child's own log line about the load, forwarded from its stderr.
        assert f"'model': '{tiny_model}'" in message
    finally:
        await eng.stop()


@module_loop
@pytest.mark.timeout(60)
async def test_stop_kills_a_child_that_does_not_answer(tiny_model: Path) -> None:
    eng = Engine()
    await eng.start()
    pid = eng.pid
    await eng.load(str(tiny_model))
    # A stopped process reads no Exit and ignores SIGTERM until continued.
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    await eng.stop(timeout=0.5)

    assert time.monotonic() - started < 5
    assert not eng.alive
    assert not psutil.pid_exists(pid)
    with pytest.raises(EngineCrashed, match="stopped"):
        await eng.load(str(tiny_model))
