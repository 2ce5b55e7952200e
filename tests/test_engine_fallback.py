"""`auto` never leaves a model unserved: an engine that dies of a fault (a broken kernel, made
here by the engine child's fault hook, EXO_ENGINE_FAULT) on a model's load, warmup or first
chat is remembered, and the model's next load takes another engine the runner has."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.ids import instance_id_of
from exojet.bus.nats import client
from exojet.bus.ops.server import NatsServer
from exojet.bus.sampling import Sampling
from exojet.runner.engine import Engine
from exojet.runner.engine_backend import FAULT_ENV
from exojet.runner.engine_errors import EngineCrashed
from exojet.runner.engine_protocol import Generate
from testbed.log_watcher import LogWatch
from tests.engine_contract import PROMPT, collect
from tests.gguf_tiny import as_gguf
from tests.procs import exojet, exojet_output, start_runner, stop


@pytest.fixture
def both_engines_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny llama as an mlx-lm folder with its GGUF beside it (both engines run it)."""
    folder = tmp_path / "models" / "local--tiny"
    shutil.copytree(tiny_model_dir, folder)
    as_gguf(tiny_model_dir, folder / "model.gguf")
    return folder


@pytest.mark.timeout(60)
async def test_a_fault_in_warmup_moves_the_model_to_the_other_engine(
    both_engines_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "llamacpp:warmup")
    eng = Engine("auto")
    await eng.start()
    try:
        first = await eng.load(str(both_engines_model))
        assert (first.engine, first.engine_reason) == ("llamacpp", "")
        with pytest.raises(EngineCrashed, match="llamacpp engine process was killed by SIGSEGV"):
            await eng.warmup()

        await eng.start()
        second = await eng.load(str(both_engines_model))
        assert second.engine == "mlx"
        assert "llamacpp crashed on this model" in second.engine_reason
        assert "SIGSEGV during warmup" in second.engine_reason
        await eng.warmup()
        _, done = await collect(eng, Generate(messages=PROMPT, sampling=Sampling(max_tokens=4)))
        assert done.completion_tokens == 4
    finally:
        await eng.stop()


@pytest.mark.timeout(60)
async def test_a_kill_is_not_held_against_the_engine(both_engines_model: Path) -> None:
    eng = Engine("auto")
    await eng.start()
    try:
        await eng.load(str(both_engines_model))
        assert eng.pid is not None
        await eng.stop(timeout=0.1)  # the runner's own stop, then a SIGKILL: neither is the engine's fault
        await eng.start()
        again = await eng.load(str(both_engines_model))
        assert (again.engine, again.engine_reason) == ("llamacpp", "")
    finally:
        await eng.stop()


@pytest.mark.timeout(180)
async def test_the_instance_is_served_on_the_other_engine_after_a_crash(
    nats_server: NatsServer, both_engines_model: Path, tmp_path: Path, nc: NATS
) -> None:
    watch = LogWatch()
    await watch.start(nc)
    models_dir = both_engines_model.parent
    runner = start_runner("r1", nats_server.url, models_dir, tmp_path, env={FAULT_ENV: "llamacpp:warmup"})
    supervisor = exojet("supervisor", "--nats", nats_server.url, "--id", "s0", log=tmp_path / "s0.log")
    try:
        ack = await client.publish(nc.jetstream(), subjects.COMMANDS, PlaceInstance(model_id="local/tiny"))
        instance_id = instance_id_of(None, ack.seq)
        await watch.until(
            lambda s: instance_id in s.instances and s.instances[instance_id].status == "Ready", 150, "Ready"
        )
        tasks = watch.state.tasks.values()
        [crashed] = [t for t in tasks if t.task_type == "StartWarmup" and t.status == "Failed"]
        assert "llamacpp engine process was killed by SIGSEGV" in (crashed.error_message or "")
        loads = [t for t in tasks if t.task_type == "LoadModel" and t.status == "Complete"]
        assert [t.result["engine"] for t in loads if t.result] == ["llamacpp", "mlx"]
        assert "llamacpp crashed on this model" in loads[-1].result["engine_reason"]
        state = await exojet_output("state", "--nats", nats_server.url)
        assert "mlx (llamacpp crashed on this model" in state
    finally:
        stop(supervisor)
        stop(runner)
