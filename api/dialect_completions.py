"""OpenAI's legacy completions: `POST /v1/completions`, a prompt continued as given.

Each prompt (a string, or a list of them: one choice each) becomes a routed chat whose
one message is the prompt, marked `raw` so the engine applies no chat template. The
chats are routed together and answered together (`choices[i]` for `prompt[i]`); streamed,
each one's text follows the one before. Parameters OpenAI has and exojet does not do
(`echo`, `suffix`, `logprobs`, `logit_bias`, `best_of` or `n` other than 1, penalties) are
a 400 naming them; errors are OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from exojet.api import dialect_base as base
from exojet.api import request_rules as rules
from exojet.api.chat_request import MAX_STOP_SEQUENCES, SEED_MAX, ChatRequest, Penalty, StreamOptions
from exojet.api.dialect_openai import DONE
from exojet.api.errors import ApiError, bad_request
from exojet.api.gateway import Gateway
from exojet.api.json_body import decode_object
from exojet.bus.chat_ends import Ended
from exojet.bus.nats.chat_stream import ChatStream
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage

if TYPE_CHECKING:
    from exojet.api.app import Api

REFUSED = {
    "echo": "echo (the prompt in the answer) is not supported",
    "suffix": "suffix (fill in the middle) is not supported",
    "logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
}
# Accepted only at the value that changes nothing.
NO_OP_DEFAULTS: dict[str, object] = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0}
# OpenAI's default length of a completion.
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 16

Text = Annotated[str, msgspec.Meta(min_length=1)]


class CompletionsBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Text
    prompt: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=SEED_MAX)] | None = None
    stop: Text | Annotated[list[Text], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    best_of: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None


RULES: dict[type, tuple[rules.Rule, ...]] = {CompletionsBody: (rules.STREAM_OPTIONS,)}


def _parse(raw: bytes, limit: int) -> tuple[ChatRequest, ...]:
    """One raw chat per prompt."""
    data = decode_object(raw)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and any(not isinstance(p, str) for p in prompt):
        raise bad_request("prompt: token ids are not supported, only text", param="prompt", code="unsupported")
    body = base.strict_body(data, CompletionsBody, REFUSED, lambda name: f"Unrecognized request argument: {name}")
    rules.check(RULES[CompletionsBody], body)
    for name, default in NO_OP_DEFAULTS.items():
        if (value := getattr(body, name)) is not None and value != default:
            raise bad_request(f"{name}={value!r} is not supported (only {default!r})", param=name, code="unsupported")
    max_tokens = base.answer_length(body.max_tokens or min(DEFAULT_MAX_TOKENS, limit), "max_tokens", limit)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    stop = tuple(body.stop) if isinstance(body.stop, list) else body.stop
    return tuple(
        ChatRequest(
            model=body.model,
            messages=(ChatMessage("user", prompt),),
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            sampling=Sampling(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop or None
            ),
            raw=True,
        )
        for prompt in prompts
    )


def _usage(outcomes: list[Ended]) -> dict[str, int]:
    prompt = sum(base.tokens(o)[0] for o in outcomes)
    completion = sum(base.tokens(o)[1] for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Completions:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def create(self, request: Request) -> Response:
        reqs = _parse(await request.body(), self.api.config.max_tokens_limit)
        gateway = self.api.gw
        streams: list[ChatStream] = []
        try:
            for req in reqs:
                streams.append(await base.route(gateway, req))
        except BaseException:
            for stream in streams:
                gateway.close(stream, "another prompt of its request failed")
            raise
        head = {"id": streams[0].chat_id, "object": "text_completion", "created": int(time.time())}
        head["model"] = reqs[0].model
        if reqs[0].stream:
            body = _events(gateway, streams, head, reqs[0].include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers=base.NO_BUFFERING)
        try:
            async with asyncio.TaskGroup() as group:
                asked = [group.create_task(base.whole(request, gateway, stream)) for stream in streams]
        except* ApiError as failed:
            raise failed.exceptions[0] from None
        answers = [a.result() for a in asked]
        if any(a is None for a in answers):
            return base.gone()
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": base.finish_reason(outcome)}
            for i, (text, outcome) in enumerate(a for a in answers if a is not None)
        ]
        usage = _usage([a[1] for a in answers if a is not None])
        return base.json_response({**head, "system_fingerprint": None, "choices": choices, "usage": usage})


async def _events(
    gateway: Gateway, streams: list[ChatStream], head: dict[str, Any], include_usage: bool
) -> AsyncIterator[bytes]:
    tail: dict[str, Any] = {"usage": None} if include_usage else {}

    def choice(index: int, text: str, finish_reason: str | None = None) -> bytes:
        return base.sse(
            {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}
            | tail
        )

    outcomes: list[Ended] = []
    try:
        for index, stream in enumerate(streams):
            async for piece in base.pieces(gateway, stream):
                if isinstance(piece, str):
                    yield choice(index, piece)
                elif isinstance(piece, ApiError):
                    yield base.sse(piece.body())
                    yield DONE
                    return
                else:
                    outcomes.append(piece)
                    yield choice(index, "", base.finish_reason(piece))
        if include_usage:
            yield base.sse({**head, "choices": [], "usage": _usage(outcomes)})
        yield DONE
    finally:
        # Every chat not over yet is cancelled: the stream ended early, or its client went away.
        for stream in streams:
            gateway.close(stream, "client disconnected")


def routes(api: Api) -> list[Route]:
    return [Route("/v1/completions", Completions(api).create, methods=["POST"])]
