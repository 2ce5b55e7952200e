"""/openapi.json says what the parsers accept: each body below is valid against the document's
request schema exactly when its route's parser takes it, and a refusal names the parameter.

Pure: the document and the parsers, no stack (tests/test_api.py runs schemathesis on a live one).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jsonschema_rs
import pytest

import exojet
from exojet.api import anthropic_request, dialect_completions, dialect_ollama, responses_request
from exojet.api.chat_request import NO_OP_DEFAULTS, UNSUPPORTED, ChatBody, parse_chat
from exojet.api.errors import ApiError
from exojet.api.openapi import schema
from testbed import REPO

LIMIT = 64
DOCUMENT = schema(LIMIT, secured=False, models=["local/tiny"])
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _validator(component: str) -> jsonschema_rs.Validator:
    root = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    return jsonschema_rs.validator_for(root)


CHAT = _validator("ChatCompletionRequest")


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "local/tiny", "messages": USER} | fields


def _refused(body: dict[str, Any], parse: Callable[[bytes, int], object] = parse_chat) -> ApiError | None:
    try:
        parse(json.dumps(body).encode(), LIMIT)
    except ApiError as err:
        assert err.status == 400
        return err
    return None


ACCEPTED = [
    _chat(),
    _chat(stream=True, stream_options={"include_usage": True}),
    _chat(stream_options=None),
    _chat(temperature=2, top_p=1, max_tokens=LIMIT, presence_penalty=0, frequency_penalty=0.0, n=1),
    _chat(tools=[TOOL], tool_choice="required"),
    _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}),
    _chat(tool_choice="none"),
    _chat(tools=[TOOL], tool_choice="none", response_format={"type": "json_object"}),
    _chat(tools=[TOOL], response_format={"type": "text"}),
    _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    _chat(
        messages=[
            *USER,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "1"},
        ]
    ),
    _chat(logit_bias=None, store=False, metadata={}, functions=[]),
    _chat(n=3, logprobs=True, top_logprobs=20, logit_bias={"60": -100, "7": 2.5}),
    _chat(n=2, tools=[TOOL], tool_choice="none"),
]

# Each body breaks one rule; the parameter the 400 names.
REFUSED = [
    (_chat(stream_options={"include_usage": True}), "stream_options"),
    (_chat(stream=False, stream_options={}), "stream_options"),
    (_chat(temperature=2.5), "temperature"),
    (_chat(top_p=0), "top_p"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(max_completion_tokens=LIMIT + 1), "max_completion_tokens"),
    (_chat(presence_penalty=2.5), "presence_penalty"),
    (_chat(frequency_penalty=-3), "frequency_penalty"),
    (_chat(presence_penalty=1), "presence_penalty"),
    (_chat(n=9), "n"),
    (_chat(logit_bias={"1": 101}), "logit_bias[...]"),
    (_chat(logit_bias={"one": 1}), "logit_bias"),
    (_chat(top_logprobs=2), "top_logprobs"),
    (_chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (_chat(n=2, tools=[TOOL]), "n"),
    (_chat(store=True), "store"),
    (_chat(seed=2**70), "seed"),
    (_chat(tool_choice="required"), "tool_choice"),
    (_chat(tools=[], tool_choice="auto"), "tool_choice"),
    (_chat(tools=[TOOL], response_format={"type": "json_object"}), "response_format"),
    (_chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (_chat(messages=[{"role": "user"}]), "messages[0].content"),
    (_chat(messages=[{"role": "assistant", "content": None, "tool_calls": []}]), "messages[0].content"),
    (_chat(messages=[{"role": "tool", "content": "1"}]), "messages[0].tool_call_id"),
    (_chat(colour="red"), "colour"),
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_what_the_document_allows_the_parser_takes(body: dict[str, Any]) -> None:
    assert CHAT.is_valid(body)
    assert _refused(body) is None


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_what_the_parser_refuses_the_document_forbids(body: dict[str, Any], param: str) -> None:
    assert not CHAT.is_valid(body)
    err = _refused(body)
    assert err is not None and err.param == param, err and err.message


def test_the_answer_length_bound_is_the_apis_limit() -> None:
    properties = DOCUMENT["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": LIMIT} in properties["max_tokens"]["anyOf"]
    assert properties["model"]["examples"] == ["local/tiny"]


def test_the_document_states_the_installed_version() -> None:
    # One version, pyproject's, read from the installed package (the runner's RunnerRegistered
    # and the supervisor's service say the same `exojet.__version__`).
    assert DOCUMENT["info"]["version"] == metadata.version("exojet") == exojet.__version__


COMPLETION = ("CompletionRequest", dialect_completions._parse)
RESPONSE = ("ResponsesRequest", responses_request.parse_responses)
ANTHROPIC = ("AnthropicMessagesRequest", anthropic_request.parse_messages)
COUNT = ("AnthropicCountTokensRequest", functools.partial(anthropic_request.parse_messages, count_only=True))
TEXT = {"type": "text", "text": "hi"}
TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}
CHOSEN = {"type": "tool", "name": "f", "disable_parallel_tool_use": True}
JSON_FORMAT = {"type": "json_schema", "schema": {"type": "object"}}
# A call and its result in the history.
CALLED: list[dict[str, Any]] = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": [TEXT, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": 1}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [TEXT]}, TEXT]},
]
# A Responses function tool, and a call of it and its output in the history.
FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}
CALLED_ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "hi"},
    {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}", "id": "fc_1", "status": "completed"},
    {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "4"}]},
]
OLLAMA_CHAT = ("OllamaChatRequest", dialect_ollama.parse_chat)
OLLAMA_GENERATE = ("OllamaGenerateRequest", dialect_ollama.parse_generate)
# The other routes generated from structs: ((document component, parser), body, the param refused or None).
OTHERS = [
    (OLLAMA_CHAT, {"messages": USER, "options": {"num_predict": 4, "num_ctx": 8, "min_p": 0}, "images": []}, None),
    (OLLAMA_CHAT, {"messages": [{"role": "user", "content": "hi", "images": None}], "colour": "red"}, None),
    (OLLAMA_CHAT, {"messages": [{"role": "tool", "content": "1", "tool_name": "f"}]}, None),
    (OLLAMA_CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}, None),
    (
        OLLAMA_CHAT,
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
        "messages[0].tool_calls[0].function.arguments",
    ),
    (OLLAMA_CHAT, {"messages": [{"role": "user", "content": "hi", "images": ["x"]}]}, "messages[0].images"),
    (OLLAMA_CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    (OLLAMA_CHAT, {"messages": USER, "format": "json", "tools": []}, None),
    (OLLAMA_CHAT, {"messages": USER, "format": {"type": "object"}}, None),
    (OLLAMA_CHAT, {"messages": USER, "format": "xml"}, "format"),
    (OLLAMA_CHAT, {"messages": USER, "format": "json", "tools": [{"function": {"name": "f"}}]}, "format"),
    (OLLAMA_CHAT, {"messages": USER, "tools": [{"function": {"description": "no name"}}]}, "tools[0].function"),
    (OLLAMA_GENERATE, {"prompt": "hi", "format": {"type": "object"}}, None),
    (OLLAMA_GENERATE, {"prompt": "hi", "format": 7}, "format"),
    (OLLAMA_CHAT, {"messages": USER, "options": {"top_k": 5}}, "options.top_k"),
    (OLLAMA_CHAT, {"messages": USER, "options": {"num_predict": 0}}, "options.num_predict"),
    (OLLAMA_GENERATE, {"prompt": "hi", "raw": True, "system": ""}, None),
    (OLLAMA_GENERATE, {"prompt": "hi", "raw": True, "system": "be brief"}, "system"),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "system": [TEXT], "output_config": {"effort": "low"}}, None),
    (ANTHROPIC, {"max_tokens": 4, "messages": [{"role": "user", "content": [TEXT, TEXT]}], "tools": []}, None),
    (ANTHROPIC, {"max_tokens": LIMIT + 1, "messages": USER}, "max_tokens"),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "temperature": 1.5}, "temperature"),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "top_k": 5}, "top_k"),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "output_config": {"format": {}}}, "output_config.format"),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "messages.0.content.0.type",
    ),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0]",
    ),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "system": [{"type": "tool_use"}]}, "system.0.type"),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "tools": [TOOL], "tool_choice": CHOSEN}, None),
    (ANTHROPIC, {"max_tokens": 4, "messages": CALLED, "tools": [TOOL], "tool_choice": {"type": "any"}}, None),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "output_config": {"format": JSON_FORMAT}}, None),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}}, "tool_choice"),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": USER, "tools": [TOOL], "tool_choice": {"type": "tool"}},
        "tool_choice.name",
    ),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": USER, "tools": [TOOL | {"input_schema": {}}]},
        "tools.0.input_schema.type",
    ),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": USER, "tools": [TOOL | {"defer_loading": True}]},
        "tools.0.defer_loading",
    ),
    (ANTHROPIC, {"max_tokens": 4, "messages": USER, "tools": [TOOL | {"name": "a.b"}]}, "tools[0].name"),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": USER, "tools": [TOOL], "output_config": {"format": JSON_FORMAT}},
        "output_config.format",
    ),
    (
        ANTHROPIC,
        {"max_tokens": 4, "messages": [{"role": "user", "content": CALLED[1]["content"]}]},
        "messages.0.content.1.type",
    ),
    (COUNT, {"messages": USER, "system": "be brief"}, None),
    (COUNT, {"messages": USER, "tools": [TOOL], "tool_choice": CHOSEN}, None),
    (COUNT, {"messages": USER, "max_tokens": 4}, "max_tokens"),
    (COMPLETION, {"prompt": "hi"}, None),
    (COMPLETION, {"prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}}, None),
    (COMPLETION, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETION, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    (COMPLETION, {"prompt": "hi", "n": 2}, "n"),
    (COMPLETION, {"prompt": "hi", "echo": True}, "echo"),
    (COMPLETION, {"prompt": "hi", "echo": False, "max_tokens": LIMIT}, None),
    (COMPLETION, {"prompt": "hi", "max_tokens": LIMIT + 1}, "max_tokens"),
    (RESPONSE, {"input": "hi"}, None),
    (RESPONSE, {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}, None),
    (RESPONSE, {"input": "hi", "stream": True, "stream_options": {}}, None),
    (RESPONSE, {"input": "hi", "stream_options": {}}, "stream_options"),
    (RESPONSE, {"input": [{"role": "user"}]}, "input[0].content"),
    (RESPONSE, {"input": "hi", "tools": [FUNCTION], "tool_choice": {"type": "function", "name": "f"}}, None),
    (RESPONSE, {"input": CALLED_ITEMS, "tools": [FUNCTION], "parallel_tool_calls": False}, None),
    (RESPONSE, {"input": "hi", "text": {"format": {"type": "json_object"}}}, None),
    (RESPONSE, {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, None),
    (RESPONSE, {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    (
        RESPONSE,
        {"input": "hi", "tools": [FUNCTION], "text": {"format": {"type": "json_object"}}},
        "text.format",
    ),
    (
        RESPONSE,
        {"input": "hi", "tools": [FUNCTION], "tool_choice": "none", "text": {"format": {"type": "json_object"}}},
        None,
    ),
    (RESPONSE, {"input": "hi", "tool_choice": "required"}, "tool_choice"),
    (RESPONSE, {"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    (RESPONSE, {"input": "hi", "tools": [FUNCTION], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    (RESPONSE, {"input": "hi", "tools": [FUNCTION | {"defer_loading": True}]}, "tools[0].defer_loading"),
    (RESPONSE, {"input": "hi", "tools": [FUNCTION | {"defer_loading": False, "async": None}]}, None),
    (RESPONSE, {"input": "hi", "tools": [FUNCTION | {"name": "a.b"}]}, "tools[0].name"),
    (RESPONSE, {"input": [CALLED_ITEMS[1] | {"role": "assistant"}]}, "input[0].role"),
    (RESPONSE, {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    (RESPONSE, {"input": [{"role": "user", "content": "hi", "call_id": "c"}]}, "input[0].call_id"),
    (
        RESPONSE,
        {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
        "input[0].output[0].type",
    ),
    (RESPONSE, {"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    (RESPONSE, {"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    (RESPONSE, {"input": "hi", "store": True}, "store"),
    (RESPONSE, {"input": "hi", "max_tool_calls": 2**64}, "max_tool_calls"),
    (RESPONSE, {"input": "hi", "max_tool_calls": 2**64 - 1}, None),
    (RESPONSE, {"input": "hi", "max_output_tokens": 8}, "max_output_tokens"),
]


@pytest.mark.parametrize(("route", "body", "param"), OTHERS)
def test_the_other_openai_routes_documents_agree_with_their_parsers(
    route: tuple[str, Callable[[bytes, int], object]], body: dict[str, Any], param: str | None
) -> None:
    component, parse = route
    body = {"model": "local/tiny"} | body
    assert _validator(component).is_valid(body) == (param is None)
    err = _refused(body, parse)
    assert (err and err.param) == param, err and err.message


def test_the_design_notes_parameter_table_is_what_the_chat_route_does() -> None:
    notes = (REPO / "docs" / "design-notes.md").read_text()
    table = notes[notes.index("### Every OpenAI chat-completions parameter") :]
    rows = re.findall(r"^\| `(\w+)` \| ([a-z -]+) \| (.*) \|$", table, re.MULTILINE)
    status = {name: kind for name, kind, _ in rows}
    assert len(status) == len(rows), "a parameter is listed twice"
    fields = set(ChatBody.__struct_fields__)
    assert {n for n, k in status.items() if k in ("supported", "no-op")} == fields - set(NO_OP_DEFAULTS)
    assert {n for n, k in status.items() if k == "default only"} == set(NO_OP_DEFAULTS)
    assert {n for n, k in status.items() if k == "refused"} == set(UNSUPPORTED)
    for name, kind, what in rows:
        if kind == "default only":
            assert what.strip("`").startswith(json.dumps(NO_OP_DEFAULTS[name]).strip('"')), name


def test_numbers_are_read_as_json_schema_reads_them() -> None:
    # A whole float is an integer; an integer past 64 bits a number (the engine's pipe holds 64 bits).
    huge = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10**30}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": huge}}
    raw = json.dumps(_chat(max_tokens=3.0, tools=[tool])).encode()
    request = parse_chat(raw, LIMIT)
    assert request.sampling.max_tokens == 3
    parameters = request.shape.tools[0].function.parameters
    assert parameters is not None and parameters["properties"]["n"]["maximum"] == 1e30
