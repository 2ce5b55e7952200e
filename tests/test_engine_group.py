"""Engines joined in a pipeline group over the MLX ring backend, on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from exojet.bus.ops.server import free_port
from exojet.bus.sampling import Sampling
from exojet.runner import ring_identity
from exojet.runner.engine import Engine
from exojet.runner.engine_errors import EngineCrashed, EngineError
from exojet.runner.engine_protocol import Done, Generate, Message, Token

pytestmark = pytest.mark.timeout(120)

PROMPT = [Message(role="user", content="Tell me a long story")]
# Far more tokens than a generation reaches before its cancel: it only ends by it.
ENDLESS = 1_000_000


async def text_of(engine: Engine, max_tokens: int) -> str:
    done = None
    async for reply in engine.generate(Generate(messages=PROMPT, sampling=Sampling(max_tokens=max_tokens))):
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
        streams = [
            engines[r].generate(Generate(messages=PROMPT, sampling=Sampling(max_tokens=100_000))) for r in range(2)
        ]
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


async def _until_cancelled(engine: Engine, tokens_before_cancel: int | None) -> Done:
    """Generate without end; after `tokens_before_cancel` tokens (None: never) cancel this rank only."""
    tokens = 0
    async for reply in engine.generate(Generate(messages=PROMPT, sampling=Sampling(max_tokens=ENDLESS))):
        if isinstance(reply, Done):
            return reply
        tokens += 1
        if tokens == tokens_before_cancel:
            engine.cancel()
    raise AssertionError("the generation ended without Done")


async def test_a_cancel_on_one_rank_stops_every_rank_at_the_same_token(tiny_model_dir: Path) -> None:
    engines = await group_of(2, tiny_model_dir, [(0, 2), (2, 4)])
    try:
        # Only rank 1 is cancelled (as when its CancelTask arrives first): rank 0 learns it
        # through the step's stop sum, and both end on the same token.
        first, second = await asyncio.wait_for(
            asyncio.gather(_until_cancelled(engines[0], None), _until_cancelled(engines[1], 5)), 60
        )
        assert first.finish_reason == second.finish_reason == "cancelled"
        assert first.completion_tokens == second.completion_tokens >= 5
        assert first.text == second.text
        # The ring is intact and in lockstep: the next generation agrees on every rank.
        again = await asyncio.gather(*(text_of(e, 12) for e in engines))
        assert len(set(again)) == 1 and again[0]
    finally:
        await stop_all(engines)


def _stranger(host: str, hello: str, seed: bytes | None, bound_s: float = 20.0) -> str:
    """Knock on a rank's ring port as a peer claiming rank 0 (signing with `seed`, if any);
    the rank's last answer."""
    ip, port = host.rsplit(":", 1)
    deadline = time.monotonic() + bound_s
    while True:
        try:
            sock = socket.create_connection((ip, int(port)), timeout=5)
            break
        except ConnectionRefusedError:
            # The rank opens its port as its ConnectGroup starts.
            assert time.monotonic() < deadline, f"nothing listens on {host}"
            time.sleep(0.05)
    with sock, sock.makefile("rwb") as f:
        if seed is None:
            f.write(f"{hello}\n".encode())
        else:
            f.write(f"{hello} {ring_identity.nonce()}\n".encode())
            f.flush()
            challenge = f.readline().decode().split()
            assert challenge[0] == "PROVE", challenge
            f.write(f"PROOF {ring_identity.prove(seed, 'g', 0, challenge[2])}\n".encode())
        f.flush()
        return f.readline().decode().strip()


async def test_a_signed_ring_refuses_strangers_by_name_and_still_assembles(tiny_model_dir: Path) -> None:
    seeds = [ring_identity.new_seed() for _ in range(2)]
    keys = [ring_identity.public_key(s) for s in seeds]
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    engines = [Engine(), Engine()]
    for engine in engines:
        await engine.start()
    try:
        rank1 = asyncio.create_task(engines[1].connect_group("g", 2, 1, hosts, 30.0, seeds[1], keys))
        # Before rank 0 comes: a plain hello, then a hello signed with a key that is not rank 0's.
        unsigned = await asyncio.to_thread(_stranger, hosts[1], "EXOJET-RING g 2 0", None)
        assert unsigned.startswith("NO ") and "unsigned" in unsigned
        forged = await asyncio.to_thread(_stranger, hosts[1], "EXOJET-RING g 2 0", ring_identity.new_seed())
        assert forged.startswith("NO ") and "claims rank 0 but its proof is not signed by rank 0's key" in forged
        joined0 = await engines[0].connect_group("g", 2, 0, hosts, 30.0, seeds[0], keys)
        joined1 = await rank1
        assert joined0.refused == []
        assert len(joined1.refused) == 2 and all(r.startswith("127.0.0.1:") for r in joined1.refused)
        assert "unsigned" in joined1.refused[0] and "claims rank 0" in joined1.refused[1]
        # Nothing died: the group serves, in lockstep.
        await asyncio.gather(engines[0].load(str(tiny_model_dir), 0, 2), engines[1].load(str(tiny_model_dir), 2, 4))
        texts = await asyncio.gather(*(text_of(e, 8) for e in engines))
        assert len(set(texts)) == 1 and texts[0]
    finally:
        await stop_all(engines)


async def test_a_rank_that_cannot_prove_itself_is_named_and_the_runner_may_start_again(tiny_model_dir: Path) -> None:
    seeds = [ring_identity.new_seed() for _ in range(2)]
    keys = [ring_identity.public_key(s) for s in seeds]
    impostor = socket.create_server(("127.0.0.1", 0))
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{impostor.getsockname()[1]}"]

    def pose_as_rank_1() -> None:
        # Listens where rank 1 should, answers rank 0's challenge with a key of its own.
        conn, _ = impostor.accept()
        with conn, conn.makefile("rwb") as f:
            nonce = f.readline().decode().split()[-1]
            f.write(f"PROVE {ring_identity.prove(ring_identity.new_seed(), 'g', 1, nonce)} {'0' * 32}\n".encode())
            f.flush()
            f.readline()

    engine = Engine()
    await engine.start()
    try:
        posing = asyncio.create_task(asyncio.to_thread(pose_as_rank_1))
        with pytest.raises(EngineError) as err:
            await engine.connect_group("g", 2, 0, hosts, 10.0, seeds[0], keys)
        assert err.value.error_type == "GroupConnectFailed"
        assert (
            "the peer listening for rank 1 is not rank 1: its proof is not signed by rank 1's key" in err.value.message
        )
        await posing
        # The child that tried is spent (a ring attempt cannot be undone); a fresh one serves.
        await engine.stop()
        await engine.start()
        await engine.load(str(tiny_model_dir))
        assert await text_of(engine, 4)
    finally:
        impostor.close()
        await engine.stop()
