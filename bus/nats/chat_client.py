"""A chat session on a connection of its own, and `route_chat`: one routed chat's text, for the
benches and tests (`exojet chat` uses the session itself, cli/chat_cmd.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.nats import client
from exojet.bus.nats.chat_session import DEFAULT_ROUTE_TIMEOUT_S, ChatSession
from exojet.bus.tasks import ChatMessage


@asynccontextmanager
async def chat_session(nats_url: str, name: str, **options: Any) -> AsyncIterator[ChatSession]:
    """A session (ChatSession's `options`) on its own connection to `nats_url`, stopped and closed on exit."""
    nc = await client.connect(nats_url, name=name)
    session = ChatSession(nc, **options)
    try:
        await session.start()
        yield session
    finally:
        await session.stop()
        await nc.close()


async def route_chat(
    nats_url: str,
    messages: Sequence[ChatMessage],
    model_id: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 300.0,
) -> AsyncIterator[str]:
    """Route a chat to a Ready instance (of `model_id`) on a session of its own; yield its text
    as it is generated. Raises the ChatError it ended with, TimeoutError past `timeout`."""
    async with chat_session(nats_url, "exojet-chat", route_timeout=min(timeout, DEFAULT_ROUTE_TIMEOUT_S)) as session:
        async with asyncio.timeout(timeout):
            stream = await session.open_chat()
            command = RouteChatCompletion(
                command_id=stream.command_id,
                messages=tuple(messages),
                model_id=model_id,
                max_tokens=max_tokens,
                temperature=temperature,
            )
            try:
                await session.submit(stream, command)
                async for piece in session.answer(stream):
                    if isinstance(piece, str):
                        yield piece
            finally:
                session.close(stream, "the reader stopped")
