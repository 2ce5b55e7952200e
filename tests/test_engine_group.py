"""Engines joined in a pipeline group over the MLX ring backend, on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from exojet.bus.server import free_port
from exojet.runner.engine import Done, Engine, EngineCrashed, EngineError, Generate, Token
from exojet.runner.engine_protocol import Message

pytestmark = pytest.mark.timeout(120)

PROMPT = [Message(role="user", content="Tell me a long story")]


async def text_of(engine: Engine, max_tokens: int) -> str:
    done = None
    async for reply in engine.generate(Generate(messages=PROMPT, max_tokens=max_tokens)):
        if isinstance(reply, Done):
            done = reply
    assert done is not None
    return done.text


async def group_of(n: int, model: Path, splits: list[tuple[int, int]]) -> list[Engine]:
    engines = [Engine() for _ in range(n)]
    for engine in engines:
        await engine.start()
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    joined = await asyncio.gather(*(e.connect_group("g", n, rank, hosts, 20.0) for rank, e in enumerate(engines)))
    assert [j.rank for j in joined] == list(range(n))
    loaded = await asyncio.gather(
        *(e.load(str(model), start, end) for e, (start, end) in zip(engines, splits, strict=True))
    )
    assert [(lo.start_layer, lo.end_layer) for lo in loaded] == splits
    return engines


async def stop_all(engines: list[Engine]) -> None:
    await asyncio.gather(*(e.stop(timeout=5) for e in engines))


@pytest.mark.parametrize("splits", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]], ids=["2 ranks", "3 ranks"])
async def test_pipeline_group_equals_one_engine(tiny_model_dir: Path, splits: list[tuple[int, int]]) -> None:
    single = Engine()
    await single.start()
    try:
        await single.load(str(tiny_model_dir))
        expected = await text_of(single, 40)
    finally:
        await single.stop()
    engines = await group_of(len(splits), tiny_model_dir, splits)
    try:
        texts = await asyncio.gather(*(text_of(e, 40) for e in engines))
        assert texts == [expected] * len(splits)
        # Lockstep holds across requests: a second, shorter round agrees too.
        again = await asyncio.gather(*(text_of(e, 12) for e in engines))
        assert len(set(again)) == 1 and expected.startswith(again[0])
    finally:
        await stop_all(engines)


async def test_unreachable_peer_is_named(tiny_model_dir: Path) -> None:
    engine = Engine()
    await engine.start()
    try:
        dead = f"127.0.0.1:{free_port()}"
        with pytest.raises(EngineError) as err:
            await asyncio.wait_for(engine.connect_group("g", 2, 0, [f"127.0.0.1:{free_port()}", dead], 2.0), 40)
        assert err.value.error_type == "GroupConnectFailed"
        assert dead in err.value.message
    finally:
        await engine.stop()


async def test_a_killed_rank_fails_the_other_within_the_bound(tiny_model_dir: Path) -> None:
    engines = await group_of(2, tiny_model_dir, [(0, 2), (2, 4)])
    try:
        streams = [engines[r].generate(Generate(messages=PROMPT, max_tokens=100_000)) for r in range(2)]
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        assert all(isinstance(f, Token) for f in firsts)
        os.kill(engines[1].pid, signal.SIGKILL)

        async def drain() -> None:
            async for _ in streams[0]:
                pass

        with pytest.raises(EngineCrashed) as err:
            await asyncio.wait_for(drain(), 20)
        assert "pipeline peer lost" in str(err.value) or "pipeline peer stalled" in str(err.value)
    finally:
        await stop_all(engines)
