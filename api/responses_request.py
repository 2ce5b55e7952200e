"""A `POST /v1/responses` body, validated into the routed chat (`ChatRequest`) every dialect makes.

As OpenAI's service does, an unknown field is refused (`Unknown parameter`); what exojet does not do
(stored responses, reasoning, built-in tools, images ...) is refused by name. Tools map to the chat
completions route's fields (bus/tools.py): a `function` tool is a function (its name, description,
parameters and strict flat on the tool, not under `function`), `tool_choice` `auto`/`none`/
`required` or `{type: function, name}` a named function; in `input`, `function_call` items are an
assistant's tool calls (consecutive ones, and the assistant message before them, one message) and
`function_call_output` items are `tool` messages answering `call_id`; `text.format` `json_object`/
`json_schema` is a response format. The runner renders them through the model's chat template as it
does the chat route's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exojet.api import dialect_base as base
from exojet.api import request_rules as rules
from exojet.api.chat_request import MAX_TOOLS, ChatRequest
from exojet.api.errors import bad_request
from exojet.api.json_body import decode_object
from exojet.api.request_rules import (
    CHOICE_NEEDS_TOOLS,
    GIVEN,
    NON_EMPTY,
    NULL,
    STREAM_OPTIONS,
    Cond,
    Rule,
    one_of,
    where,
)
from exojet.bus import tools as openai_tools
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage

STATELESS = "exojet's Responses API is stateless: send the whole conversation in `input`"
REFUSED = {
    "store": STATELESS,
    "previous_response_id": STATELESS,
    "conversation": STATELESS,
    "reasoning": "reasoning is not supported",
    "include": "no extra output can be included",
    "background": "background responses are not supported",
    "prompt": "prompt templates are not supported",
    "top_logprobs": "logprobs are not supported",
    "image": "images are not supported",
    "moderation": "moderation is not supported",
    "context_management": "context management is not supported",
    "access_programs": "access programs are not supported",
    "background_options": "background responses are not supported",
}
# A function tool's fields that ask for what exojet does not do.
TOOL_REFUSED = {
    "defer_loading": "tool search is not supported",
    "output_schema": "a function's output schema is not supported",
    "async": "asynchronous function calls are not supported",
}
# OpenAI's own lower bound for max_output_tokens.
MIN_OUTPUT_TOKENS = 16
# The items `input` takes; any other (a built-in tool's call, reasoning, an item reference) is refused by name.
ITEMS = ("message", "function_call", "function_call_output")
# OpenAI's rule for a function's (and a format's) name.
NAME = r"^[a-zA-Z0-9_-]{1,64}$"

Name = Annotated[str, msgspec.Meta(pattern=NAME)]
JsonSchema = openai_tools.JsonSchema


class Part(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["input_text", "output_text"]
    text: str
    # An earlier answer's, sent back as it came.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An item of `input`: a message (its `type` may be left out), an earlier answer's function
    call, or a call's output; which fields each type takes is `ITEM_RULES`."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[Part] | None = None
    call_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    name: str | None = None
    # Checked by `chat_messages` (no JSON Schema can say a string holds JSON): the document says it.
    arguments: (
        Annotated[str, msgspec.Meta(description="the call's arguments: JSON, as text", examples=["{}"])] | None
    ) = None
    output: str | list[Part] | None = None
    # An earlier answer's item, sent back as it came.
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None
    allowed_callers: list[Literal["direct"]] | None = None


class FunctionChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["function"]
    # One of `tools` (`request_rules.check_tools`).
    name: Annotated[str, msgspec.Meta(description="one of `tools`")]


ToolChoice = Literal["auto", "none", "required"] | FunctionChoice


class TextFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    # A json_schema format's (FORMAT_RULES).
    name: Name | None = None
    schema: JsonSchema | None = None
    description: str | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


Tools = Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS, description="no two share a name")]


class ResponsesBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | Annotated[list[Item], msgspec.Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=MIN_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stream: bool = False
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    # Accepted, changing nothing: echoed, or hints about caching, tiers, built-in tools' calls.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None


def _of_type(kind: str) -> Cond:
    # A message's `type` may be left out: the condition holds for an item without one.
    if kind == "message":
        return Cond({"enum": ["message"]}, lambda v: v in (None, "message"))
    return one_of(kind)


# The fields each item type needs, and those it may hold besides (a call's output may name its
# tool, as OpenAI's clients send it); any other field of an item is refused on it.
ITEM_NEEDS = {
    "message": ("role", "content"),
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}
ITEM_MAY: dict[str, tuple[str, ...]] = {"message": ("phase",), "function_call": (), "function_call_output": ("name",)}
ITEM_FIELDS = ("role", "content", "phase", "call_id", "name", "arguments", "output")
ITEM_RULES = tuple(
    Rule(when={"type": _of_type(kind)}, then={name: GIVEN}, param=name, message=f"a {kind} item needs {name}")
    for kind, needed in ITEM_NEEDS.items()
    for name in needed
) + tuple(
    Rule(when={"type": _of_type(kind)}, then={name: NULL}, param=name, message=f"a {kind} item has no {name}")
    for kind, needed in ITEM_NEEDS.items()
    for name in ITEM_FIELDS
    if name not in needed + ITEM_MAY[kind]
)
FORMAT_RULES = tuple(
    Rule(
        when={"type": one_of("json_schema")},
        then={name: GIVEN},
        param=name,
        message=f"text.format.{name}: required for type json_schema",
    )
    for name in ("name", "schema")
)
BODY_RULES = (
    STREAM_OPTIONS,
    CHOICE_NEEDS_TOOLS,
    Rule(
        when={"tools": NON_EMPTY, "text": where("format", where("type", one_of("json_object", "json_schema")))},
        then={"tool_choice": one_of("none")},
        param="text.format",
        message="tools and text.format cannot both shape one answer (tool_choice none)",
        code="unsupported_parameter",
    ),
)
RULES: dict[type, tuple[Rule, ...]] = {ResponsesBody: BODY_RULES, Item: ITEM_RULES, TextFormat: FORMAT_RULES}

_decoder = msgspec.json.Decoder()


def parse_responses(raw: bytes, limit: int) -> tuple[ResponsesBody, ChatRequest]:
    """The request in `raw` and its routed chat, or ApiError(400) naming the first thing wrong with it."""
    data = decode_object(raw)
    _refuse_items(data)
    data = _refuse_tools(data)
    body = base.strict_body(data, ResponsesBody, REFUSED, lambda name: f"Unknown parameter: '{name}'.")
    rules.check(BODY_RULES, body)
    max_tokens = base.answer_length(body.max_output_tokens, "max_output_tokens", limit)
    req = ChatRequest(
        model=body.model,
        messages=tuple(chat_messages(body)),
        stream=body.stream,
        include_usage=True,
        sampling=Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p),
        shape=_shape(body),
    )
    return body, req


def _refuse_items(data: dict[str, Any]) -> None:
    """ApiError(400) naming the first item of `input` that is not a message, a function call or its
    output (a built-in tool's call, reasoning), or a part that is not text (an image, a file),
    before the struct would call it only a wrong value."""
    items = data.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind not in ITEMS:
            raise bad_request(
                f"input[{i}].type: only messages, function calls and their outputs are supported, not {kind!r}",
                param=f"input[{i}].type",
                code="unsupported_parameter",
            )
        for field in ("content", "output"):
            parts = item.get(field) if isinstance(item, dict) else None
            for j, part in enumerate(parts if isinstance(parts, list) else ()):
                if isinstance(part, dict) and part.get("type") not in ("input_text", "output_text"):
                    where_ = f"input[{i}].{field}[{j}].type"
                    raise bad_request(f"{where_}: only text is supported, not {part.get('type')!r}", param=where_)


def _refuse_tools(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each tool's unasked-for TOOL_REFUSED fields left out; ApiError(400) naming a
    built-in tool (web search, file search, computer use ...) among `tools` or as `tool_choice`,
    or a refused field that asks for something."""
    choice = data.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(kind, str) and kind != "function":
        raise bad_request(
            f"tool_choice.type: only a function can be chosen, not {kind!r} (built-in and custom tools)",
            param="tool_choice.type",
            code="unsupported_parameter",
        )
    tools = data.get("tools")
    if not isinstance(tools, list):
        return data
    kept = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict):
            kind = tool.get("type")
            if isinstance(kind, str) and kind != "function":
                raise bad_request(
                    f"tools[{i}].type: only function tools are supported, not {kind!r} (built-in and custom tools)",
                    param=f"tools[{i}].type",
                    code="unsupported_parameter",
                )
            tool = rules.refuse(tool, TOOL_REFUSED, at=f"tools[{i}].")
        kept.append(tool)
    return {**data, "tools": kept}


def _text(content: str | list[Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def chat_messages(body: ResponsesBody) -> list[ChatMessage]:
    """`instructions` and `input` as the routed chat's messages (ApiError(400) naming an item
    whose fields do not fit its type, or a call whose arguments are not JSON)."""
    messages = [ChatMessage("system", body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, ChatMessage("user", body.input)]
    for i, item in enumerate(body.input):
        rules.check(ITEM_RULES, item, at=f"input[{i}].")
        if item.type == "message":
            assert item.role is not None, "ITEM_RULES: a message has its role"
            # `developer` is OpenAI's newer name for system, which chat templates know.
            messages.append(ChatMessage("system" if item.role == "developer" else item.role, _text(item.content)))
        elif item.type == "function_call_output":
            messages.append(ChatMessage("tool", _text(item.output), tool_call_id=item.call_id))
        else:
            call = _call(i, item)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                # The calls of one answer, and its words before them, are one assistant message.
                messages[-1] = ChatMessage("assistant", last.content, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", "", tool_calls=(call,)))
    return messages


def _call(i: int, item: Item) -> openai_tools.ToolCall:
    """The `i`th item's function call (ApiError(400) when its arguments are not JSON)."""
    assert item.call_id is not None and item.name is not None and item.arguments is not None, "ITEM_RULES"
    try:
        _decoder.decode(item.arguments)
    except msgspec.DecodeError:
        raise bad_request(
            f"input[{i}].arguments: the arguments of function call {item.call_id!r} are not JSON",
            param=f"input[{i}].arguments",
        ) from None
    return openai_tools.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)


def _shape(body: ResponsesBody) -> openai_tools.AnswerShape:
    """The tools and format the answer must keep to, as the chat completions route's fields."""
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        rules.check(FORMAT_RULES, fmt, at="text.format.")
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = openai_tools.ResponseFormat(type="json_object")
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.name is not None, "FORMAT_RULES: a json_schema format is named"
        schema = openai_tools.JsonSchemaFormat(
            name=fmt.name, schema=fmt.schema, description=fmt.description, strict=fmt.strict
        )
        response_format = openai_tools.ResponseFormat(type="json_schema", json_schema=schema)
    choice = body.tool_choice
    named = (
        openai_tools.NamedToolChoice(type="function", function=openai_tools.FunctionName(name=choice.name))
        if isinstance(choice, FunctionChoice)
        else choice
    )
    shape = openai_tools.AnswerShape(
        tools=tuple(
            openai_tools.Tool(
                type="function",
                function=openai_tools.FunctionDef(
                    name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
                ),
            )
            for t in body.tools or ()
        ),
        tool_choice=named,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format,
    )
    rules.check_tools(shape, choice="tool_choice.name")
    return shape
