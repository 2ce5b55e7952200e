"""What the API dialects' tests share: a stack with the tiny model per module, and the
OpenAI route's answer that every other dialect's must equal (they are one routed chat)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from exojet.runner.engine_llamacpp import MAX_CONTEXT
from testbed.tiny_model import with_context, write_tiny_llama
from tests.api_stack import API_KEY, MODEL, ApiStack, start_stack
from tests.gguf_tiny import as_gguf

PROMPT = "Tell me about the capital of France"


def tiny_stack(factory: pytest.TempPathFactory, name: str) -> Iterator[ApiStack]:
    """A stack (nats-server, supervisor, runner, API with a key) with the tiny model Ready."""
    root = factory.mktemp(name)
    write_tiny_llama(root / "models" / "local--tiny")
    stack = start_stack(root, root / "models")
    yield stack
    stack.close()


def tools_stack(factory: pytest.TempPathFactory, tiny_model_dir: Path, engine: str) -> Iterator[ApiStack]:
    """A stack with the tiny model Ready on `engine` (llamacpp or mlx), with the context window
    llama.cpp gives a chat on both (the tool and schema tests' stack)."""
    root = factory.mktemp(f"tools-{engine}")
    folder = with_context(tiny_model_dir, root / "models" / "local--tiny", MAX_CONTEXT)
    if engine == "llamacpp":
        # A GGUF in the folder: the runner serves it on llama.cpp.
        as_gguf(tiny_model_dir, folder / "model.gguf")
    stack = start_stack(root, root / "models")
    yield stack
    stack.close()


def openai_client(stack: ApiStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def openai_answer(stack: ApiStack, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, int]:
    """(text, prompt tokens) of the greedy chat through OpenAI's route."""
    chats = openai_client(stack).chat.completions
    answer = chats.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    text = answer.choices[0].message.content
    assert text is not None and answer.usage is not None and answer.usage.completion_tokens == max_tokens
    return text, answer.usage.prompt_tokens


def ollama_client(stack: ApiStack, timeout: float = 60) -> ollama.Client:
    """The official `ollama` client on the stack's API (its host: the client adds `/api/...`)."""
    return ollama.Client(
        host=stack.base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout
    )
