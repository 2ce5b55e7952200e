"""Schemathesis hooks (SCHEMATHESIS_HOOKS) for the run on /openapi.json in tests/test_api_schemathesis.py.

The chat completion has four rules no JSON Schema can state, which its document says in words
(`description`): no two tools share a name, a named `tool_choice` names one of them, a tool
call's `arguments` are JSON, and `logit_bias` names tokens of the model's vocabulary; and one of
the model's: the tiny model's template renders no tools, so its calls are read out of the answer's
text and `logprobs` beside tools it may call is refused by its engine. Anthropic's
Messages has the first two, Ollama's chat the first, Responses the first three. A positive case is
kept to them as a client keeps to them; a negative case is left as generated."""

from __future__ import annotations

from typing import Any

import msgspec
import schemathesis


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and case.path in ("/v1/chat/completions", "/api/chat") and isinstance(case.body, dict):
        case.body = _kept(case.body)
    if positive and case.path.startswith("/v1/messages") and isinstance(case.body, dict):
        case.body = _anthropic_kept(case.body)
    if positive and case.path == "/v1/responses" and isinstance(case.body, dict):
        case.body = _responses_kept(case.body)
    return case


def _responses_kept(body: dict[str, Any]) -> dict[str, Any]:
    """The Responses body kept to the same three rules: its function tools' names (at most 64 of
    letters, digits, `_` and `-`) made distinct, a named tool choice names the first, and a
    function_call item's arguments are JSON."""
    names = []
    for i, tool in enumerate(body.get("tools") or ()):
        tool["name"] = name = f"{tool['name'][:60]}_{i}"
        names.append(name)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and names:
        choice["name"] = names[0]
    for item in body.get("input") if isinstance(body.get("input"), list) else ():
        if isinstance(arguments := item.get("arguments"), str) and not _is_json(arguments):
            item["arguments"] = "{}"
    return body


def _is_json(text: str) -> bool:
    # JSON as the parser reads it (Python's json also takes NaN and Infinity).
    try:
        msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return True


def _anthropic_kept(body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's body kept to the same two tool rules: its tools' names (at most 128 of
    letters, digits, `_` and `-`) made distinct, and a tool choice of type tool names the first."""
    names = []
    for i, tool in enumerate(body.get("tools") or ()):
        tool["name"] = name = f"{tool['name'][:120]}_{i}"
        names.append(name)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and names:
        choice["name"] = names[0]
    return body


def _kept(body: dict[str, Any]) -> dict[str, Any]:
    names = []
    for i, tool in enumerate(body.get("tools") or ()):
        tool["function"]["name"] = name = f"{tool['function']['name']}_{i}"
        names.append(name)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and names:
        choice["function"]["name"] = names[0]
    if body.get("tools") and body.get("tool_choice") != "none":
        body.pop("logprobs", None)
        body.pop("top_logprobs", None)
    if isinstance(bias := body.get("logit_bias"), dict):
        # Token ids of the tiny model's vocabulary (320 tokens): the model's bound, no schema's.
        body["logit_bias"] = {str(int(token) % 320): value for token, value in bias.items()}
    for message in body.get("messages") or ():
        for call in message.get("tool_calls") or ():
            # JSON as the parser reads it (Python's json also takes NaN and Infinity); Ollama's
            # arguments are an object, which the document states.
            if isinstance(arguments := call["function"].get("arguments"), str) and not _is_json(arguments):
                call["function"]["arguments"] = "{}"
    return body
