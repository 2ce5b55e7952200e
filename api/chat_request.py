"""A `POST /v1/chat/completions` body, validated into what a routed chat needs.

Every OpenAI parameter is either supported, accepted at its no-op default
(`presence_penalty: 0`, `frequency_penalty: 0`), or refused with a 400
that names it: nothing a client asks for is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exojet.api import request_rules as rules
from exojet.api.errors import bad_request, invalid
from exojet.api.json_body import decode_object
from exojet.api.request_rules import CHOICE_NEEDS_TOOLS, GIVEN, NON_EMPTY, STREAM_OPTIONS, Rule, not_, one_of, where
from exojet.bus.sampling import Bias, Choices, Sampling, TopLogprobs
from exojet.bus.tasks import ChatMessage
from exojet.bus.tools import FREE, AnswerShape, ResponseFormat, Tool, ToolCall, ToolChoice

DEFAULT_MAX_TOKENS_LIMIT = 16_384
MAX_STOP_SEQUENCES = 4
# OpenAI's own bound on a request's tools.
MAX_TOOLS = 128
SEED_MAX = 2**63 - 1

# OpenAI parameters exojet does not implement yet: a 400 naming them (and why) when they ask for
# anything; null, false or an empty value asks for nothing (`request_rules.refuse`).
UNSUPPORTED = {
    "functions": "OpenAI's deprecated form of tools: send tools",
    "function_call": "OpenAI's deprecated form of tool_choice: send tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning effort is not supported",
    "service_tier": "there is one service tier",
    "web_search_options": "web search is not supported",
    "store": "nothing is stored",
    "metadata": "nothing is stored to tag with metadata",
    "moderation": "moderation is not supported",
}
# Accepted only at the value that changes nothing (a value out of OpenAI's range is refused first).
NO_OP_DEFAULTS: dict[str, object] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "verbosity": "medium",
}
# The fields whose bound is the API's --max-tokens-limit.
ANSWER_LENGTHS = ("max_tokens", "max_completion_tokens")


class TextPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # A plain field, not a msgspec tag: a tag alone may be left out, OpenAI's `type` may not.
    type: Literal["text"]
    text: str


class InFunctionCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    # Checked by `_message` (no JSON Schema can say a string holds JSON): the document says it.
    arguments: Annotated[str, msgspec.Meta(description="the call's arguments: JSON, as text")]


class InToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    type: Literal["function"]
    function: InFunctionCall


class InMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Null (or left out) only in an assistant message that calls tools.
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[InToolCall] | None = None
    tool_call_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
StopString = Annotated[str, msgspec.Meta(min_length=1)]
# A token id as a JSON object's key (logit_bias); the vocabulary's bound is the model's: a token
# beyond it is the runner's 400.
TokenIdText = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$", description="a token id of the model's vocabulary")]
# OpenAI's (and vLLM's) range of both penalties.
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]

# Between a message's fields (the parser checks them, /openapi.json states them).
NULL_CONTENT = "content may be null only in an assistant message with tool_calls"
MESSAGE_RULES = (
    Rule(when={"role": not_(one_of("assistant"))}, then={"content": GIVEN}, param="content", message=NULL_CONTENT),
    Rule(when={"tool_calls": not_(NON_EMPTY)}, then={"content": GIVEN}, param="content", message=NULL_CONTENT),
    Rule(
        when={"role": one_of("tool")},
        then={"tool_call_id": GIVEN},
        param="tool_call_id",
        message="a tool message needs the tool_call_id it answers",
    ),
)
FORMAT_RULES = (
    Rule(
        when={"type": one_of("json_schema")},
        then={"json_schema": GIVEN},
        param="json_schema",
        message="response_format: json_schema is required for type json_schema",
    ),
)
# Between the body's fields. Two rules no JSON Schema can state stay checks of their own (`_shape`):
# a named tool_choice names one of the tools, and no two tools share a name.
CHAT_RULES = (
    STREAM_OPTIONS,
    CHOICE_NEEDS_TOOLS,
    Rule(
        when={"tools": NON_EMPTY, "response_format": where("type", one_of("json_object", "json_schema"))},
        then={"tool_choice": one_of("none")},
        param="response_format",
        message="tools and response_format cannot both shape one answer",
        code="unsupported_parameter",
    ),
    Rule(
        when={"n": not_(one_of(None, 1)), "tools": NON_EMPTY},
        then={"tool_choice": one_of("none")},
        param="n",
        message="n > 1 with tools is not supported: ask for one answer",
        code="unsupported_parameter",
    ),
    Rule(
        when={"top_logprobs": GIVEN},
        then={"logprobs": one_of(True)},
        param="top_logprobs",
        message="top_logprobs needs logprobs: true",
    ),
)


class ChatBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[InMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=SEED_MAX)] | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    user: str | None = None
    # Accepted, changing nothing: who asks, and prompt caching hints (exojet reuses prompts by itself).
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    logit_bias: dict[TokenIdText, Bias] | None = None
    # Two checks of `_shape` no JSON Schema can state: the document says them.
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS, description="no two share a name")] | None = None
    tool_choice: Annotated[ToolChoice | None, msgspec.Meta(description="a named function is one of `tools`")] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


# The rules of each struct of the body, by the struct (/openapi.json states them on its schema).
RULES: dict[type, tuple[Rule, ...]] = {ChatBody: CHAT_RULES, InMessage: MESSAGE_RULES, ResponseFormat: FORMAT_RULES}


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the API routes: the chat's fields as `RouteChatCompletion` takes them."""

    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool
    include_usage: bool
    sampling: Sampling
    shape: AnswerShape = FREE
    # The message's content is the prompt as given (no chat template).
    raw: bool = False


_decoder = msgspec.json.Decoder()


def parse_chat(raw: bytes, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> ChatRequest:
    """The request in `raw`, or ApiError(400) naming the first thing wrong with it."""
    data = _check_names(decode_object(raw))
    try:
        body = msgspec.convert(data, ChatBody)
    except msgspec.ValidationError as err:
        raise invalid(err) from None
    for name, default in NO_OP_DEFAULTS.items():
        value = getattr(body, name)
        if value is not None and value != default:
            raise bad_request(f"{name}={value!r} is not supported (only {default!r})", param=name, code="unsupported")
    rules.check(CHAT_RULES, body)
    for param in ANSWER_LENGTHS:
        if (value := getattr(body, param)) is not None and value > max_tokens_limit:
            raise bad_request(f"{param} must be at most {max_tokens_limit}, got {value}", param=param)
    # max_completion_tokens is OpenAI's newer name; given both, it wins.
    max_tokens = body.max_completion_tokens or body.max_tokens
    stop = tuple(body.stop) if isinstance(body.stop, list) else body.stop
    return ChatRequest(
        model=body.model,
        messages=tuple(_message(i, m) for i, m in enumerate(body.messages)),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop or None,
            logprobs=body.logprobs or None,
            top_logprobs=body.top_logprobs or None,
            n=body.n if body.n != 1 else None,
            logit_bias={int(token): bias for token, bias in body.logit_bias.items()} if body.logit_bias else None,
        ),
        shape=_shape(body),
    )


def _shape(body: ChatBody) -> AnswerShape:
    """The tools and format the answer must keep to (ApiError(400) when they do not fit together)."""
    fmt = body.response_format
    shape = AnswerShape(
        tools=tuple(body.tools or ()),
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=None if fmt is None or fmt.type == "text" else fmt,
    )
    rules.check_tools(shape)
    if fmt is not None:
        rules.check(FORMAT_RULES, fmt, at="response_format.")
    return shape


def _check_names(data: dict[str, Any]) -> dict[str, Any]:
    """`data` less the unsupported parameters that ask for nothing; ApiError(400) naming the first
    unsupported parameter that asks for something, or the first unknown one."""
    data = rules.refuse(data, UNSUPPORTED)
    unknown = [k for k in data if k not in ChatBody.__struct_fields__]
    if unknown:
        raise bad_request(
            f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter"
        )
    return data


def _message(i: int, m: InMessage) -> ChatMessage:
    # Chat templates know system/user/assistant; `developer` is OpenAI's new name for system.
    role = "system" if m.role == "developer" else m.role
    rules.check(MESSAGE_RULES, m, at=f"messages[{i}].")
    parts = m.content or ""
    content = parts if isinstance(parts, str) else "".join(p.text for p in parts)
    for c in m.tool_calls or ():
        try:
            _decoder.decode(c.function.arguments)
        except msgspec.DecodeError:
            raise bad_request(
                f"the arguments of tool call {c.id!r} are not JSON", param=f"messages[{i}].tool_calls"
            ) from None
    calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or ())
    return ChatMessage(role, content, tool_calls=calls, tool_call_id=m.tool_call_id)
