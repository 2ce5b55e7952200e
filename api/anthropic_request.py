"""An Anthropic Messages body (`POST /v1/messages`, `/v1/messages/count_tokens`), validated into
the routed chat (`ChatRequest`) every dialect makes.

As Anthropic's service does, an unknown field is refused ("Extra inputs are not permitted"); fields
exojet does not do (thinking, top_k, server tools, images ...) are refused by name. Tools map to the
OpenAI route's fields (bus/tools.py): a tool's `input_schema` is a function's `parameters`,
`tool_choice` any is `required`, `disable_parallel_tool_use` is `parallel_tool_calls: false`, an
assistant's `tool_use` blocks are its tool calls and a user's `tool_result` blocks are `tool`
messages; `output_config.format` is a `json_schema` response format. The runner renders them
through the model's chat template as it does the OpenAI route's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from exojet.api import dialect_base as base
from exojet.api import request_rules as rules
from exojet.api.chat_request import ChatRequest
from exojet.api.errors import bad_request
from exojet.api.json_body import decode_object
from exojet.api.request_rules import GIVEN, NON_EMPTY, NULL, Rule, not_, one_of, where
from exojet.bus import tools as openai_tools
from exojet.bus.sampling import Sampling
from exojet.bus.tasks import ChatMessage

REFUSED = {
    "thinking": "extended thinking is not supported",
    "top_k": "top_k is not supported by exojet's engines",
    "container": "containers are not supported",
    "mcp_servers": "MCP servers are not supported",
    "context_management": "context management is not supported",
}
# A custom tool's fields that ask for what exojet does not do (tool search, programmatic calls, examples).
TOOL_REFUSED = {
    "defer_loading": "tool search is not supported",
    "allowed_callers": "only direct calls are supported",
    "input_examples": "input examples are not supported",
}
MAX_STOP_SEQUENCES = 4
# What count_tokens takes besides REFUSED's fields.
COUNT_FIELDS = frozenset(
    (
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "cache_control",
        "output_config",
        "speed",
        "user_profile_id",
        "workspace_id",
    )
)
# The blocks each place takes; any other is refused by name (images, documents, thinking ...).
BLOCKS = {"system": ("text",), "user": ("text", "tool_result"), "assistant": ("text", "tool_use")}
# Anthropic's rule for a custom tool's name.
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,128}$"
OBJECT_SCHEMA = {"required": ["type"], "properties": {"type": {"const": "object"}}}
# Anthropic's tool choices as the OpenAI route's ("tool" is a NamedToolChoice).
CHOICES: dict[str, openai_tools.ToolChoice] = {"auto": "auto", "any": "required", "none": "none"}
# The name the routed chat's json_schema format gets (Anthropic's format has none).
FORMAT_NAME = "output"

Text = Annotated[str, msgspec.Meta(min_length=1)]
CacheControl = dict[str, Any] | None


class TextBlock(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="text", tag_field="type"):
    text: str
    # Prompt caching hints (Claude Code sends them): nothing to cache here.
    cache_control: CacheControl = None
    citations: None = None


class ToolUseBlock(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="tool_use", tag_field="type"):
    id: Text
    name: Text
    input: dict[str, Any]
    cache_control: CacheControl = None


class ToolResultBlock(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="tool_result", tag_field="type"):
    tool_use_id: Text
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: CacheControl = None


class UserMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="user", tag_field="role"):
    content: str | list[TextBlock | ToolResultBlock]


class AssistantMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="assistant", tag_field="role"):
    content: str | list[TextBlock | ToolUseBlock]


class ToolDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=TOOL_NAME)]
    # A JSON Schema of an object (its `type` "object": `_tool` checks what the document states).
    input_schema: Annotated[dict[str, Any], msgspec.Meta(extra_json_schema=OBJECT_SCHEMA)]
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: CacheControl = None
    # Input is streamed as it comes either way.
    eager_input_streaming: bool | None = None


class ToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    # The tool's name when `type` is "tool" (one of `tools`: a rule no JSON Schema states).
    name: Annotated[str | None, msgspec.Meta(description="one of `tools`")] = None
    disable_parallel_tool_use: bool | None = None


class JsonFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, frozen=True):
    # Its `effort` (and any other hint) changes nothing here.
    format: JsonFormat | None = None


class MessagesBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Text
    messages: Annotated[list[UserMessage | AssistantMessage], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[Text], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    tools: Annotated[list[ToolDef], msgspec.Meta(description="no two share a name")] | None = None
    tool_choice: ToolChoice | None = None
    # Accepted, changing nothing: the caller's metadata, prompt caching hints, Anthropic's
    # capacity tiers, speed and region choices, and who is asking.
    metadata: dict[str, Any] | None = None
    cache_control: CacheControl = None
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    output_config: OutputConfig | None = None


CHOICE_RULES = (
    Rule(
        when={"type": one_of("tool")},
        then={"name": GIVEN},
        param="tool_choice.name",
        message="tool_choice.name: required for type tool",
    ),
    Rule(
        when={"type": not_(one_of("tool"))},
        then={"name": NULL},
        param="tool_choice.name",
        message="tool_choice.name: only for type tool",
    ),
)
BODY_RULES = (
    Rule(
        when={"tool_choice": where("type", not_(one_of("none")))},
        then={"tools": NON_EMPTY},
        param="tool_choice",
        message="tool_choice: only allowed when tools are given",
    ),
    Rule(
        when={"tools": NON_EMPTY, "output_config": where("format", GIVEN)},
        then={"tool_choice": where("type", one_of("none"))},
        param="output_config.format",
        message="output_config.format: tools and a JSON format cannot both shape one answer (tool_choice none)",
        code="unsupported_parameter",
    ),
)
RULES: dict[type, tuple[Rule, ...]] = {MessagesBody: BODY_RULES, ToolChoice: CHOICE_RULES}


def parse_messages(raw: bytes, limit: int, count_only: bool = False) -> ChatRequest:
    """The request in `raw`, or ApiError(400) naming the first thing wrong with it."""
    data = decode_object(raw)
    if count_only:
        # count_tokens takes the prompt's fields only: it answers no message.
        extra = [k for k in data if k not in COUNT_FIELDS and k not in REFUSED]
        if extra:
            raise bad_request(f"{extra[0]}: Extra inputs are not permitted", param=extra[0])
        data = {**data, "max_tokens": 1}
    _refuse_blocks(data)
    data = _refuse_tool_fields(data)
    body = base.strict_body(data, MessagesBody, REFUSED, lambda name: f"{name}: Extra inputs are not permitted")
    rules.check(BODY_RULES, body)
    if body.tool_choice is not None:
        rules.check(CHOICE_RULES, body.tool_choice)
    base.answer_length(body.max_tokens, "max_tokens", limit)
    messages = [ChatMessage("system", _text(body.system))] if body.system else []
    for m in body.messages:
        messages += _user(m) if isinstance(m, UserMessage) else [_assistant(m)]
    return ChatRequest(
        model=body.model,
        messages=tuple(messages),
        stream=body.stream,
        include_usage=True,
        sampling=Sampling(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop_sequences) if body.stop_sequences else None,
        ),
        shape=_shape(body),
    )


def _refuse_blocks(data: dict[str, Any]) -> None:
    """ApiError(400) naming the first block its place does not take (images, documents, a
    tool_use in a user message ...) by name, before the struct would call it only a wrong value."""
    messages = data.get("messages")
    contents = [("system", "system", data.get("system"))] + [
        (f"messages.{i}.content", m.get("role"), m.get("content"))
        for i, m in enumerate(messages if isinstance(messages, list) else ())
        if isinstance(m, dict)
    ]
    for where_, role, content in contents:
        taken = BLOCKS.get(role, ("text",)) if isinstance(role, str) else ("text",)
        for i, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in taken:
                raise bad_request(
                    f"{where_}.{i}.type: {role} content takes {', '.join(taken)} blocks, not {kind!r}",
                    param=f"{where_}.{i}.type",
                )
            inner = block.get("content") if kind == "tool_result" else None
            for j, part in enumerate(inner if isinstance(inner, list) else ()):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise bad_request(
                        f"{where_}.{i}.content.{j}.type: a tool result takes text blocks, not {kind!r}",
                        param=f"{where_}.{i}.content.{j}.type",
                    )


def _refuse_tool_fields(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each tool's unasked-for TOOL_REFUSED fields left out; ApiError(400) naming a
    server tool (web search, bash, code execution ...) or a refused field that asks for something."""
    tools = data.get("tools")
    if not isinstance(tools, list):
        return data
    kept = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict):
            kind = tool.get("type")
            if kind not in (None, "custom"):
                raise bad_request(
                    f"tools.{i}.type: server tools ({kind!r}) are not supported, only custom tools",
                    param=f"tools.{i}.type",
                )
            tool = rules.refuse(tool, TOOL_REFUSED, at=f"tools.{i}.")
        kept.append(tool)
    return {**data, "tools": kept}


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _user(m: UserMessage) -> list[ChatMessage]:
    """A user message as the routed chat holds it: a `tool` message per tool_result block (in their
    order, as Anthropic puts them first), then its text, if any."""
    if isinstance(m.content, str):
        return [ChatMessage("user", m.content)]
    results = [b for b in m.content if isinstance(b, ToolResultBlock)]
    text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
    out = [ChatMessage("tool", _result_text(b), tool_call_id=b.tool_use_id) for b in results]
    return out + [ChatMessage("user", text)] if text or not results else out


def _result_text(block: ToolResultBlock) -> str:
    # A failed tool says so to the model: no chat template has a field for it.
    text = _text(block.content)
    return f"Error: {text}" if block.is_error else text


def _assistant(m: AssistantMessage) -> ChatMessage:
    if isinstance(m.content, str):
        return ChatMessage("assistant", m.content)
    calls = tuple(
        openai_tools.ToolCall(id=b.id, name=b.name, arguments=json.dumps(b.input))
        for b in m.content
        if isinstance(b, ToolUseBlock)
    )
    text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
    return ChatMessage("assistant", text, tool_calls=calls)


def _shape(body: MessagesBody) -> openai_tools.AnswerShape:
    """The tools and format the answer must keep to, as the OpenAI route's fields."""
    choice = body.tool_choice
    single = choice.disable_parallel_tool_use if choice is not None else None
    fmt = body.output_config.format if body.output_config is not None else None
    json_format = None
    if fmt is not None:
        schema = openai_tools.JsonSchemaFormat(name=FORMAT_NAME, schema=fmt.schema, strict=True)
        json_format = openai_tools.ResponseFormat(type="json_schema", json_schema=schema)
    shape = openai_tools.AnswerShape(
        tools=tuple(_tool(i, t) for i, t in enumerate(body.tools or ())),
        tool_choice=_choice(choice),
        parallel_tool_calls=None if single is None else not single,
        response_format=json_format,
    )
    rules.check_tools(shape, choice="tool_choice.name")
    return shape


def _tool(i: int, tool: ToolDef) -> openai_tools.Tool:
    if tool.input_schema.get("type") != "object":
        raise bad_request(f"tools.{i}.input_schema.type: must be 'object'", param=f"tools.{i}.input_schema.type")
    function = openai_tools.FunctionDef(
        name=tool.name, description=tool.description, parameters=tool.input_schema, strict=tool.strict
    )
    return openai_tools.Tool(type="function", function=function)


def _choice(choice: ToolChoice | None) -> openai_tools.ToolChoice | None:
    if choice is None:
        return None
    if choice.type == "tool":
        assert choice.name is not None, "CHOICE_RULES: a tool choice names its tool"
        return openai_tools.NamedToolChoice(type="function", function=openai_tools.FunctionName(name=choice.name))
    return CHOICES[choice.type]
