"""A model whose only instance is being moved (its runner drained: the attempt fails, and the
instance is placed again after its backoff) is a 503 `model_not_ready` through the API, never a
404 `model_not_found`, which tells a client the model does not exist (the soak found 404s while
drains moved instances, tests/test_soak.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from exojet.bus.events import InstanceFailed
from exojet.bus.nats import client
from exojet.projections.instances import on_its_way
from testbed.log_watcher import LogWatcher
from testbed.tiny_model import write_tiny_llama
from tests.api_stack import API_KEY, MODEL, ApiStack, start_stack


def test_a_failed_attempt_is_on_its_way_until_it_is_final() -> None:
    assert on_its_way("Ready", False) and on_its_way("Placing", False)
    assert on_its_way("Failed", False)
    assert not on_its_way("Failed", True)
    assert not on_its_way("Deleted", False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    write_tiny_llama(tmp_path / "models" / "local--tiny")
    s = start_stack(tmp_path, tmp_path / "models")
    yield s
    s.close()


@pytest.mark.timeout(180)
async def test_a_chat_while_its_model_moves_is_503_model_not_ready(stack: ApiStack) -> None:
    nc = await client.connect(stack.url, name="test")
    watcher = await LogWatcher().start(nc)
    try:
        stack.cli("drain", "r1")
        await watcher.wait_for(lambda m: isinstance(m, InstanceFailed) and not m.final, 60)
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as moving:
            await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert moving.value.status_code == 503
        assert moving.value.body["code"] == "model_not_ready"  # type: ignore[index]
    finally:
        await watcher.stop()
        await nc.close()
