"""A ChatCompletion on the engine: tokens streamed to `exo.chunks.<runner_id>.<stream_id>`, the
result summarised for the task's `Complete` status."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client as NATS

from exojet.bus.results import ChatResult, wire
from exojet.bus.sampling import Sampling, sampling_of
from exojet.bus.tasks import ChatCompletion, Group
from exojet.runner.chunks import ChunkStream
from exojet.runner.engine import Engine
from exojet.runner.engine_protocol import Done, Generate, Message, Token


class Answer(NamedTuple):
    """A chat's result (for its `Complete`) and its last chunks on their way to `EXO_CHUNKS`
    (None when this rank streams none): the runner writes its `RunnerReady` while they are
    stored and awaits them before the task's terminal status, one round trip instead of two."""

    result: dict[str, Any]
    delivered: asyncio.Future[None] | None


async def chat(
    engine: Engine,
    nc: NATS,
    runner_id: str,
    group: Group | None,
    task: ChatCompletion,
    task_id: str,
    cancelled: asyncio.Event | None = None,
) -> Answer:
    """Generate the answer; only the rank the task names (`emit_rank`) streams chunks and keeps the text.

    Once `cancelled` is set the engine is asked to stop at once, no token is
    streamed any more and the result's `finish_reason` is "cancelled": a lone
    engine stops at its next token; the ranks of a group stop together at the
    first token whose step saw one rank's cancel (so a cancel that reaches only
    one rank stops them all).
    """
    request_id = engine.next_request_id()
    request = Generate(
        messages=[Message(m.role, m.content, m.tool_calls, m.tool_call_id) for m in task.messages],
        sampling=_lockstep(sampling_of(task), task.stream_id) if group is not None else sampling_of(task),
        raw=task.raw,
        request_id=request_id,
        tools=task.tools,
        tool_choice=task.tool_choice,
        parallel_tool_calls=task.parallel_tool_calls is not False,
        response_format=task.response_format,
    )
    emits = task.emit_rank == (group.rank if group else 0)
    chunks = ChunkStream(nc, runner_id, task.stream_id or task_id, task_id) if emits else None
    stop = cancelled or asyncio.Event()
    # The engine hears of a cancel as soon as it comes, not at the next text it sends
    # (which may be a whole frame of tokens later).
    canceller = asyncio.ensure_future(_cancel_when(stop, engine, request_id))
    done = None
    asked_again = False
    try:
        async for reply in engine.generate(request):
            if isinstance(reply, Done):
                done = reply
            elif stop.is_set():
                if not asked_again:
                    # A cancel set before the request reached the child was ignored there:
                    # once text comes back, the request is in, and this one is heard.
                    engine.cancel(request_id)
                    asked_again = True
            elif chunks is None:
                continue
            elif isinstance(reply, Token):
                await chunks.add(reply.text, reply.choice, reply.logprobs)
            else:
                await chunks.add_tool_call(reply.delta)
    finally:
        canceller.cancel()
    assert done is not None
    finish_reason = "cancelled" if stop.is_set() else done.finish_reason
    delivered = asyncio.ensure_future(chunks.finish(finish_reason)) if chunks is not None else None
    result = ChatResult(
        text=done.text if emits else "",
        finish_reason=finish_reason,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        tokens_per_second=round(done.tokens_per_second, 2),
        engine_seconds=round(done.seconds, 6),
        time_to_first_token=round(done.time_to_first_token, 6),
        tool_calls=done.tool_calls if emits else (),
        choices=done.choices if emits else (),
    )
    return Answer(wire(result), delivered)


async def _cancel_when(stop: asyncio.Event, engine: Engine, request_id: int) -> None:
    await stop.wait()
    engine.cancel(request_id)  # it answers Done within a token (in a group, with every rank at the same one)


def _lockstep(sampling: Sampling, stream_id: str | None) -> Sampling:
    """Every rank of a group must sample the same tokens: without a seed of the
    user's, derive one from what all ranks' tasks share (the chat's stream id)."""
    if sampling.seed is not None or sampling.greedy:
        return sampling
    return msgspec.structs.replace(sampling, seed=zlib.crc32((stream_id or "").encode()))
