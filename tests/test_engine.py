"""The MLX engine: the engine contract (tests/engine_contract.py) on the tiny random
llama, the reference answers from mlx-lm in this process; then what only MLX does
(loading a shard of the layers), and the stop-string scanner every engine uses."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import msgspec
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exojet.bus.sampling import Sampling
from exojet.bus.tools import ToolCall
from exojet.models.gguf_import import import_gguf
from exojet.models.smollm import ensure_default_model
from exojet.runner.engine import Engine
from exojet.runner.engine_errors import EngineError
from exojet.runner.engine_protocol import Generate, LayersLoaded, Message
from exojet.runner.executor import LoadThrottle
from exojet.runner.mlx_capacity import MAX_CHATS
from exojet.runner.mlx_cpu import choose_weights, to_dense_float32
from exojet.runner.stop_scanner import StopScanner
from testbed.tiny_model import write_tiny_llama
from tests.engine_contract import (
    DEFAULT_MODEL_BOUND,
    PROMPT,
    WEATHER,
    EngineContract,
    ToolsContract,
    class_loop,
    collect,
)
from tests.gguf_tiny import Q, as_gguf
from tests.logprobs_contract import LogprobsContract


class MLXContract(EngineContract, ToolsContract, LogprobsContract):
    """The engine contract on MLX, with the tiny llama as it is; subclasses change the model."""

    ENGINE = "mlx"
    # The tiny models' KV caches are small: memory allows the most chats a batch takes.
    CHAT_CAPACITY = MAX_CHATS

    @pytest.fixture(scope="class")
    @classmethod
    def model_path(cls, tiny_model_dir: Path) -> Path:
        return tiny_model_dir

    @pytest.fixture(scope="class")
    @classmethod
    def big_model_path(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return write_tiny_llama(tmp_path_factory.mktemp("big") / "llama", hidden_size=768)

    @pytest.fixture(scope="class")
    @classmethod
    def direct(cls, model_path: Path):
        from mlx_lm import stream_generate
        from mlx_lm.utils import load

        model, tokenizer = load(str(model_path))
        # The weights as the engine runs them: dense float32 where it chooses that.
        weights, _ = choose_weights(model, True, "auto", psutil.virtual_memory().available)
        if weights == "dense":
            to_dense_float32(model)
        prompt = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in PROMPT], add_generation_prompt=True
        )

        def greedy(max_tokens: int) -> str:
            return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))

        return greedy

    @pytest.fixture
    def corrupt_model(self, tmp_path: Path) -> Path:
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        (corrupt / "config.json").write_text("{not json")
        return corrupt


class TestMLXEngine(MLXContract):
    """The contract, and what only MLX does."""

    @class_loop
    @pytest.mark.timeout(60)
    async def test_shard_load_materialises_only_its_layers(self, engine: Engine, model_path: Path) -> None:
        reports: list[tuple[int, int]] = []

        async def on_layers(reply: LayersLoaded) -> None:
            reports.append((reply.done, reply.total))

        whole = await engine.load(str(model_path), on_layers=on_layers)
        assert reports == [(1, 4), (2, 4), (3, 4), (4, 4)]
        reports.clear()
        middle = await engine.load(str(model_path), start_layer=1, end_layer=3, on_layers=on_layers)
        # One report per layer of the shard, counted within it.
        assert reports == [(1, 2), (2, 2)]

        assert (middle.start_layer, middle.end_layer, middle.n_layers) == (1, 3, 4)
        # Two of four layers, and neither the embeddings nor the head.
        assert 0 < middle.weight_bytes < whole.weight_bytes / 2

        with pytest.raises(EngineError) as err:
            await engine.load(str(model_path), start_layer=3, end_layer=9)
        assert err.value.error_type == "InvalidShard"


# A Qwen-style template that renders tools (mlx-lm reads such a model's calls with its json_tools parser).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for tool_call in message.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@class_loop
@pytest.mark.timeout(60)
async def test_a_template_that_renders_tools_gets_them_and_its_history(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "tools")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    ask = [Message(role="user", content="weather?")]
    call = ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris", "days": 2}')
    history = [*ask, Message(role="assistant", content="", tool_calls=(call,))]
    from mlx_lm.utils import load_tokenizer

    engine = Engine("mlx")
    await engine.start()
    try:
        await engine.load(str(folder))
        _, plain = await collect(engine, Generate(messages=ask, sampling=Sampling(max_tokens=2)))
        _, tools = await collect(engine, Generate(messages=ask, tools=(WEATHER,), sampling=Sampling(max_tokens=2)))
        _, earlier = await collect(
            engine, Generate(messages=history, tools=(WEATHER,), sampling=Sampling(max_tokens=2))
        )
        _, required = await collect(
            engine, Generate(messages=ask, tools=(WEATHER,), tool_choice="required", sampling=Sampling(max_tokens=2))
        )
    finally:
        await engine.stop()
    # The template rendered the tool, and the earlier call with its arguments as an object (as
    # Hugging Face templates take them): the prompts are the template's own rendering.
    tokenizer = load_tokenizer(folder)
    tool = msgspec.to_builtins(WEATHER)
    assistant = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": call.name, "arguments": {"city": "Paris", "days": 2}}}],
    }
    rendered = [
        tokenizer.apply_chat_template(m, tools=[tool], add_generation_prompt=True)
        for m in ([{"role": "user", "content": "weather?"}], [{"role": "user", "content": "weather?"}, assistant])
    ]
    assert (tools.prompt_tokens, earlier.prompt_tokens) == tuple(len(r) for r in rendered)
    assert tools.prompt_tokens > plain.prompt_tokens + 30
    # A required call takes the generic path (its prompt, not the template's tools), whose schema constrains it.
    assert required.prompt_tokens not in (plain.prompt_tokens, tools.prompt_tokens)


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


def test_load_progress_is_throttled_but_keeps_the_first_and_the_last() -> None:
    throttle = LoadThrottle(0.5)
    # 400 layers a millisecond apart: 0.4 s in all.
    sent = [done for done in range(1, 401) if throttle.due(done, 400, done / 1000)]
    assert sent == [1, 400]
    slow = LoadThrottle(0.5)
    # A layer every 0.2 s: one report in three, plus the last.
    sent = [done for done in range(1, 11) if slow.due(done, 10, done * 0.2)]
    assert sent == [1, 4, 7, 10]


class _MLXImportOfGguf(MLXContract):
    """MLX on the mlx-lm import (`exojet models import-gguf`) of the tiny llama's GGUF in `QTYPE`."""

    QTYPE = Q.Q4_0

    @pytest.fixture(scope="class")
    @classmethod
    def model_path(cls, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
        root = tmp_path_factory.mktemp(f"mlx-{cls.QTYPE.name}")
        gguf = as_gguf(tiny_model_dir, root / "tiny.gguf", cls.QTYPE)
        return import_gguf(gguf, f"test/tiny-{cls.QTYPE.name.lower()}", root / "models")


class TestMLXImportQ4_0(_MLXImportOfGguf):
    QTYPE = Q.Q4_0


class TestMLXImportQ4_1(_MLXImportOfGguf):
    QTYPE = Q.Q4_1


class TestMLXImportQ8_0(_MLXImportOfGguf):
    QTYPE = Q.Q8_0


@pytest.mark.slow
class TestMLXDefaultModel(MLXContract):
    """The default model as MLX serves it (its import of the shipped GGUF), through the contract's
    tests that depend on the model; slow on a CPU, so in the slow set (.ci/run runs it after the
    suite)."""

    N_LAYERS = 30
    MODEL_BOUND = DEFAULT_MODEL_BOUND

    @pytest.fixture(scope="class")
    @classmethod
    def model_path(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return ensure_default_model(tmp_path_factory.mktemp("models"))
