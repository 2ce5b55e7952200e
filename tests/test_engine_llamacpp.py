"""The llama.cpp engine (`exojet[llamacpp]`): the engine contract (tests/engine_contract.py)
on the tiny llama written as a GGUF, the reference answers from llama-cpp-python's own
`create_chat_completion` in this process.

Without llama-cpp-python these tests skip and say so; run-tests.sh (CI) installs the
extra and sets EXO_REQUIRE_ENGINES=1, which turns that skip into a failure."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from exojet.runner.engine import Engine, EngineError
from exojet.runner.engine_llamacpp import MAX_CONTEXT
from exojet.runner.engine_protocol import Generate
from tests.engine_contract import PROMPT, EngineContract, class_loop, collect
from tests.gguf_tiny import Q, write_tiny_gguf
from tests.tiny_model import write_tiny_llama

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("EXO_REQUIRE_ENGINES") == "1":
        raise ImportError("EXO_REQUIRE_ENGINES=1 but llama-cpp-python is not installed (pip install '.[llamacpp]')")
    pytest.skip("llama-cpp-python is not installed (pip install '.[llamacpp]')", allow_module_level=True)


def as_gguf(folder: Path, dest: Path) -> Path:
    write_tiny_gguf(folder, dest, lambda _name: Q.F32)
    return dest


class TestLlamaCppEngine(EngineContract):
    ENGINE = "llamacpp"
    # The context window llama.cpp is given, less the prompt.
    ENDLESS = MAX_CONTEXT - 64

    @pytest.fixture(scope="class")
    @classmethod
    def model_path(cls, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return as_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")

    @pytest.fixture(scope="class")
    @classmethod
    def big_model_path(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        root = tmp_path_factory.mktemp("big")
        return as_gguf(write_tiny_llama(root / "llama", hidden_size=768), root / "big.gguf")

    @pytest.fixture(scope="class")
    @classmethod
    def direct(cls, model_path: Path):
        """llama-cpp-python's greedy tokens for the prompt its own chat handler renders.

        Exactly max_tokens tokens: create_chat_completion itself goes on past max_tokens
        while the text ends inside a UTF-8 character (random weights emit such bytes)."""
        from llama_cpp import Llama, llama_vocab_is_eog
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from exojet.runner.engine_llamacpp import llama_options

        llm = Llama(**llama_options(model_path))
        messages = [{"role": m.role, "content": m.content} for m in PROMPT]
        # As Llama.__init__ builds its chat handler from the GGUF's template.
        formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm._model.token_get_text(llm.token_eos()),
            bos_token=llm._model.token_get_text(llm.token_bos()),
        )
        rendered = formatter(messages=messages)
        prompt = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

        def greedy(max_tokens: int) -> str:
            tokens: list[int] = []
            for token in llm.generate(prompt, temp=0.0, reset=True):
                if llama_vocab_is_eog(llm._model.vocab, token) or len(tokens) == max_tokens:
                    break
                tokens.append(token)
            return llm.detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="ignore")

        return greedy

    @pytest.fixture
    def corrupt_model(self, tmp_path: Path) -> Path:
        corrupt = tmp_path / "corrupt.gguf"
        corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        return corrupt

    @class_loop
    @pytest.mark.timeout(60)
    async def test_a_request_beyond_the_context_window_is_refused_and_the_engine_serves_on(
        self, engine: Engine, model_path: Path
    ) -> None:
        await engine.load(str(model_path))
        with pytest.raises(EngineError) as err:
            await collect(engine, Generate(messages=PROMPT, max_tokens=MAX_CONTEXT))
        assert err.value.error_type == "ContextLengthExceeded"
        assert f"context window of {MAX_CONTEXT} tokens" in str(err.value)
        _, done = await collect(engine, Generate(messages=PROMPT, max_tokens=4))
        assert done.completion_tokens == 4
