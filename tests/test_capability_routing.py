"""Capabilities are stated, not assumed (issue 30, item 4): a runner states what it can do with the
model it loaded (its LoadModel result), the projection keeps it per runner, and the router (pure)
sends a chat that needs one only to an instance whose runners state it, else refuses it by name.
A runner that states nothing (v0.1.0) is capacity 1 and is sent no chat carrying a field it would
ignore (issue 31, item 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from exojet.bus.capabilities import KNOWN, Capabilities, capabilities, common, needed
from exojet.bus.commands import PlaceInstance, RouteChatCompletion
from exojet.bus.events import ChatRefused
from exojet.bus.results import LoadResult, result_as
from exojet.bus.statuses import RunnerIdle
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.bus.tools import FunctionDef, JsonSchemaFormat, ResponseFormat, Tool, ToolCall
from exojet.projections.instances import instance_capabilities
from exojet.supervisor.actions import WriteEvent
from exojet.supervisor.planner import plan
from tests.api_stack import API_KEY, MODEL, ApiStack
from tests.dialect_stack import ollama_client
from tests.planner_cluster import Cluster, ready_single

HI = (ChatMessage("user", "what is the weather in paris?"),)
WEATHER = Tool(type="function", function=FunctionDef(name="get_weather", parameters={"type": "object"}))
CALLED = ToolCall(id="c1", name="get_weather", arguments='{"city": "paris"}')
SCHEMA = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="a", schema={"type": "object"}))

# Each kind of chat, and what a runner must state to be given it.
CHATS: dict[str, tuple[dict[str, object], Capabilities]] = {
    "plain": ({}, ()),
    "text format": ({"response_format": ResponseFormat(type="text")}, ()),
    "tools": ({"tools": (WEATHER,)}, ("tools",)),
    "a call in the history": (
        {"messages": (*HI, ChatMessage("assistant", "", tool_calls=(CALLED,)))},
        ("tools",),
    ),
    "a tool result in the history": (
        {"messages": (*HI, ChatMessage("tool", "sunny", tool_call_id="c1"))},
        ("tools",),
    ),
    "json object": ({"response_format": ResponseFormat(type="json_object")}, ("response_format",)),
    "json schema": ({"response_format": SCHEMA}, ("response_format",)),
    "raw": ({"raw": True, "messages": (ChatMessage("user", "Once upon"),)}, ("raw",)),
    "logprobs": ({"logprobs": True}, ("logprobs",)),
    "top logprobs": ({"logprobs": True, "top_logprobs": 3}, ("logprobs",)),
    "one answer": ({"n": 1}, ()),
    "n": ({"n": 3}, ("n",)),
    "logit bias": ({"logit_bias": {15: -100.0}}, ("logit_bias",)),
    "tools and schema": ({"tools": (WEATHER,), "response_format": SCHEMA}, ("response_format", "tools")),
}


def _route(c: Cluster, command_id: str, kind: str, model: str | None = "local/tiny") -> list[ChatCompletion]:
    fields = {"messages": HI, **CHATS[kind][0]}
    c.command(RouteChatCompletion(command_id=command_id, model_id=model, **fields))  # type: ignore[arg-type]
    return [t for t in c.publish(plan(c.state)) if isinstance(t, ChatCompletion)]


@pytest.mark.parametrize("kind", list(CHATS))
def test_what_each_chat_needs_is_the_fields_a_runner_would_otherwise_ignore(kind: str) -> None:
    fields, need = CHATS[kind]
    routed = RouteChatCompletion(**{"messages": HI, **fields})  # type: ignore[arg-type]
    task = ChatCompletion(**{"messages": HI, **fields})  # type: ignore[arg-type]
    assert needed(routed, routed) == needed(task, task) == need


def test_a_chat_needing_tools_goes_only_to_the_instance_that_states_them_however_busy() -> None:
    c = Cluster()
    c.chat_capacity = 4
    c.capabilities = {"mlx": ("raw",), "llama": ("raw", "response_format", "tools")}
    for r in ("llama", "mlx"):
        c.register(r)
    llama, mlx = ready_single(c, "llama"), ready_single(c, "mlx")
    assert c.state.runners["mlx"].capabilities == ("raw",)
    assert instance_capabilities(c.state.runners, c.state.instances[llama]) == ("raw", "response_format", "tools")

    sent = [t for k in range(3) for t in _route(c, f"t{k}", "tools")]
    plain = [t for k in range(2) for t in _route(c, f"p{k}", "plain")]
    raw = _route(c, "r", "raw")

    assert [t.instance_id for t in sent] == [llama] * 3  # mlx is idle, but cannot do them
    assert all(t.tools == (WEATHER,) for t in sent)
    assert [t.instance_id for t in plain] == [mlx, mlx]  # the less loaded, as before
    assert len(raw) == 1  # both state raw prompts


def test_a_chat_no_ready_instance_can_do_is_refused_by_name_and_never_routed() -> None:
    c = Cluster()
    c.capabilities = {"r1": ("raw",), "r2": ("raw", "tools")}
    for r in ("r1", "r2"):
        c.register(r)
    a, b = ready_single(c, "r1"), ready_single(c, "r2")

    c.command(RouteChatCompletion(command_id="x", model_id="local/tiny", messages=HI, **CHATS["tools and schema"][0]))  # type: ignore[arg-type]
    actions = plan(c.state)
    assert c.publish(actions) == []

    [event] = [a.event for a in actions if isinstance(a, WriteEvent)]
    assert isinstance(event, ChatRefused) and event.chat_id == "chat-x"
    assert c.state.chats["chat-x"].status == "Refused" and "chat-x" not in c.state.pending_chats
    assert plan(c.state) == []  # never routed later
    assert event.error_type == "CapabilityMissing"
    assert event.reason.startswith(
        "no instance of local/tiny can do structured output (response_format), tool calls: "
    ), event.reason
    assert f"{a} (on r1) can do raw prompts" in event.reason
    assert f"{b} (on r2) can do raw prompts, tool calls" in event.reason


def test_a_chat_for_a_model_with_no_ready_instance_waits_rather_than_being_refused() -> None:
    c = Cluster()
    c.capabilities = {"r1": ()}
    c.register("r1")
    ready_single(c, "r1")
    assert _route(c, "x", "tools", model="local/elsewhere") == []
    assert "chat-x" in c.state.pending_chats  # an instance of that model may yet come


def test_a_runner_that_states_nothing_is_capacity_1_and_gets_no_field_it_would_ignore() -> None:
    c = Cluster()
    c.chat_capacity = 8  # what the simulated runners would say, if they said it
    c.capabilities = {"old": None}
    c.register("old")
    old = ready_single(c, "old")
    view = c.state.runners["old"]
    assert (view.chat_capacity, view.capabilities) == (1, ())

    for kind, (_, need) in CHATS.items():
        sent = _route(c, kind.replace(" ", "-"), kind)
        if need:
            assert sent == [], kind
            assert c.state.chats[f"chat-{kind.replace(' ', '-')}"].status == "Refused"
        else:
            [task] = sent
            assert task.instance_id == old and needed(task, task) == ()


def test_a_group_can_do_what_every_rank_states() -> None:
    c = Cluster()
    c.capabilities = {"r1": ("raw", "tools"), "r2": ("raw",)}
    c.register("r1")
    c.register("r2")
    c.command(PlaceInstance(model_id="local/tiny", min_runners=2))
    c.run({"local/tiny": 4})
    [inst] = c.state.instances.values()
    assert len(inst.placements) == 2 and instance_capabilities(c.state.runners, inst) == ("raw",)
    assert _route(c, "t", "tools", model=None) == []
    assert c.state.chats["chat-t"].status == "Refused"
    assert [t.task_id for t in _route(c, "r", "raw", model=None)] == ["chat-r.0"]


def test_capabilities_end_with_the_model_and_with_the_process() -> None:
    c = Cluster()
    c.register("r1")
    ready_single(c, "r1")
    assert c.state.runners["r1"].capabilities == KNOWN
    c.status("r1", RunnerIdle())
    assert c.state.runners["r1"].capabilities == ()
    ready_single(c, "r1")
    c.register("r1")  # a new incarnation holds no model
    assert c.state.runners["r1"].capabilities == ()


def test_a_newer_runners_unknown_capability_is_left_out_and_its_result_still_read() -> None:
    loaded = result_as(LoadResult, {"chat_capacity": 4, "capabilities": ["tools", "telepathy", "raw"]})
    assert loaded is not None and loaded.chat_capacity == 4
    assert capabilities(loaded.capabilities) == ("raw", "tools")
    assert common([("raw", "tools"), ("tools",)]) == ("tools",) and common([]) == ()


@pytest.fixture
def pipeline(tmp_path: Path, models_dir: Path) -> Iterator[ApiStack]:
    """The tiny model Ready over r1 and r2 on MLX: a pipeline rank decodes no grammar, so the
    instance states raw prompts only."""
    s = ApiStack(tmp_path, models_dir, runners=("r1", "r2"))
    try:
        s.place("--runners", "r1,r2", "--min-runners", "2")
        s.wait_api()
        yield s
    finally:
        s.close()


@pytest.mark.timeout(240)
def test_a_chat_with_tools_on_a_cluster_that_cannot_do_them_is_a_400_naming_it(pipeline: ApiStack) -> None:
    client = openai.OpenAI(base_url=pipeline.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ask = [{"role": "user", "content": "what is the weather in paris?"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:  # a stream's status line says it
            client.chat.completions.create(model=MODEL, messages=ask, tools=tools, stream=stream, max_tokens=8)  # type: ignore[call-overload]
        assert refused.value.body["code"] == "CapabilityMissing", refused.value.body  # type: ignore[index]
        assert f"no instance of {MODEL} can do tool calls: " in refused.value.message
        assert "(on r1, r2) can do raw prompts" in refused.value.message
    # Anthropic's route: its error shape, before any byte of a stream (the status line says it).
    claude = anthropic.Anthropic(base_url=pipeline.base_url.removesuffix("/v1"), api_key=API_KEY, max_retries=0)
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as refused_too:
            claude.messages.create(
                model=MODEL,
                max_tokens=8,
                messages=ask,  # type: ignore[arg-type]
                tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
                stream=stream,
            )
        error: Any = refused_too.value.body
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
        assert f"no instance of {MODEL} can do tool calls: " in error["error"]["message"]
    # The Responses route: function tools and a JSON format, OpenAI's shape, before any event.
    function = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": False}
    json_format: Any = {"format": {"type": "json_object"}}
    for needs, more in [("tool calls", {"tools": [function]}), ("structured output", {"text": json_format})]:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused_there:
                client.responses.create(model=MODEL, input=ask, stream=stream, max_output_tokens=16, **more)  # type: ignore[arg-type]
            assert refused_there.value.body["code"] == "CapabilityMissing", refused_there.value.body  # type: ignore[index]
            assert f"no instance of {MODEL} can do {needs}" in refused_there.value.message
    # Ollama's route: its error shape, a 400 before any line of its stream.
    llama = ollama_client(pipeline)
    assert llama.show(MODEL).capabilities == ["completion"]  # no tools: a pipeline rank states raw only
    for needs, extra in [("tool calls", {"tools": tools}), ("structured output", {"format": "json"})]:
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as refused_here:
                answer = llama.chat(model=MODEL, messages=ask, stream=stream, options={"num_predict": 8}, **extra)
                if stream:
                    next(iter(answer))
            assert refused_here.value.status_code == 400
            assert f"no instance of {MODEL} can do {needs}" in refused_here.value.error
    plain = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=4)
    assert plain.choices[0].message.content  # the instance serves what it can
    state = pipeline.cli("state")
    assert state.count("raw") == 3, state  # each runner and the instance
    # Never sent to a runner: the only chat tasks in the log are the plain chat's two ranks.
    chats = [line for line in state.splitlines() if " ChatCompletion " in line]
    assert len(chats) == 2, state
