"""What the API dialects' tests share: a stack with the tiny model per module, and the
OpenAI route's answer that every other dialect's must equal (they are one routed chat)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from testbed.tiny_model import write_tiny_llama
from tests.api_stack import API_KEY, MODEL, ApiStack, start_stack

PROMPT = "Tell me about the capital of France"


def tiny_stack(factory: pytest.TempPathFactory, name: str) -> Iterator[ApiStack]:
    """A stack (nats-server, supervisor, runner, API with a key) with the tiny model Ready."""
    root = factory.mktemp(name)
    write_tiny_llama(root / "models" / "local--tiny")
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
