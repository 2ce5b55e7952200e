"""Sampling parameters are declared once (bus/sampling.py): the routed command and the task carry
exactly those fields, flat as the wire has them, a chat's parameters reach its task unchanged, and
the engine request carries them as one `Sampling`, its bounds checked where the engine child reads it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec
import pytest

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.sampling import DEFAULT_MAX_TOKENS, GREEDY, Sampling, choices, fields, sampling_of
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.bus.tools import AnswerShape, FunctionDef, Tool, ToolCall, shape_fields, shape_of
from exojet.runner.engine_pipe import Pipe
from exojet.runner.engine_protocol import (
    Generate,
    Message,
    RequestFailed,
    Unload,
    encode_frame,
    frame_length,
    reply_decoder,
)


def _field_types(cls: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Type]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: f.type for f in info.fields}


@pytest.mark.parametrize("message", [RouteChatCompletion, ChatCompletion])
def test_every_message_that_carries_sampling_declares_the_same_fields(message: type[msgspec.Struct]) -> None:
    declared = _field_types(message)
    for name, kind in _field_types(Sampling).items():
        assert declared[name] == kind, name


def test_a_chats_sampling_reaches_its_task_and_the_wire_is_flat() -> None:
    hi = (ChatMessage("user", "hi"),)
    sampling = Sampling(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=("x", "y"),
        logprobs=True,
        top_logprobs=5,
        n=3,
        logit_bias={42: -100.0},
    )
    command = RouteChatCompletion(command_id="c", messages=hi, **fields(sampling))
    task = ChatCompletion(task_id="c.0", messages=hi, **fields(sampling_of(command)))
    assert sampling_of(task) == sampling
    wire = msgspec.json.decode(msgspec.json.encode(task))
    assert (wire["max_tokens"], wire["top_p"], wire["stop"]) == (7, 0.9, ["x", "y"])
    assert (wire["n"], wire["top_logprobs"], wire["logit_bias"]) == (3, 5, {"42": -100.0})
    assert msgspec.json.decode(msgspec.json.encode(task), type=ChatCompletion) == task
    for bad in (b'{"max_tokens": 0}', b'{"n": 9}', b'{"top_logprobs": 21}', b'{"logit_bias": {"1": 101}}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(bad, type=Sampling)


@pytest.mark.parametrize("message", [RouteChatCompletion, ChatCompletion])
def test_every_message_that_carries_the_answer_shape_declares_the_same_fields(message: type[msgspec.Struct]) -> None:
    declared = _field_types(message)
    for name, kind in _field_types(AnswerShape).items():
        assert declared[name] == kind, name


def test_a_chats_tools_reach_its_task_and_an_old_message_reads_without_them() -> None:
    call = ToolCall(id="c1", name="add", arguments='{"a": 1}')
    history = (
        ChatMessage("user", "add"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "1", tool_call_id="c1"),
    )
    tool = Tool(type="function", function=FunctionDef(name="add", parameters={"type": "object"}))
    shape = AnswerShape(tools=(tool,), tool_choice="required", parallel_tool_calls=False)
    command = RouteChatCompletion(command_id="c", messages=history, **shape_fields(shape))
    task = ChatCompletion(task_id="c.0", messages=command.messages, **shape_fields(shape_of(command)))
    again = msgspec.json.decode(msgspec.json.encode(task), type=ChatCompletion)
    assert shape_of(again) == shape
    assert again.messages == history
    # A message without tool fields is the bytes it always was.
    assert msgspec.json.encode(ChatMessage("user", "hi")) == b'{"role":"user","content":"hi"}'
    old = msgspec.json.decode(
        b'{"type":"ChatCompletion","messages":[{"role":"user","content":"hi"}]}', type=ChatCompletion
    )
    assert shape_of(old) == AnswerShape()


def test_the_engine_request_carries_the_chats_sampling_whole() -> None:
    declared = _field_types(Generate)
    assert declared["sampling"] == msgspec.inspect.type_info(Sampling)
    assert not set(declared) & set(Sampling.__struct_fields__)
    # What an unset field means, said once (bus/sampling.py's properties).
    unset = (GREEDY.answer_length, GREEDY.greedy, GREEDY.temperature_or_greedy, GREEDY.top_p_or_all)
    assert unset == (DEFAULT_MAX_TOKENS, True, 0.0, 1.0)
    assert (GREEDY.stop_strings, GREEDY.reported_top, GREEDY.biases, choices(GREEDY)) == ([], None, {}, 1)
    asked = Sampling(max_tokens=9, temperature=0.7, top_p=0.5, stop="x", logprobs=True, n=2, logit_bias={3: 1.0})
    assert (asked.answer_length, asked.greedy, asked.temperature_or_greedy, asked.top_p_or_all) == (9, False, 0.7, 0.5)
    assert (asked.stop_strings, asked.reported_top, asked.biases, choices(asked)) == (["x"], 0, {3: 1.0}, 2)
    assert Sampling(stop=("x", "y")).stop_strings == ["x", "y"]
    # top_logprobs alone asks for no log-probability (OpenAI's rule, as both engines read it).
    assert Sampling(top_logprobs=5).reported_top is None and Sampling(logprobs=True, top_logprobs=5).reported_top == 5


@pytest.fixture
def pipe() -> Iterator[tuple[Pipe, int, int]]:
    """The engine child's end of the protocol, on real pipes: (its Pipe, the parent's write end, read end)."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    yield Pipe(requests_r, replies_w), requests_w, replies_r
    for fd in (requests_r, requests_w, replies_r, replies_w):
        os.close(fd)


def _reply(fd: int) -> object:
    return reply_decoder.decode(os.read(fd, frame_length(os.read(fd, 4))))


@pytest.mark.parametrize(
    ("sampling", "field"),
    [(Sampling(max_tokens=0), "max_tokens"), (Sampling(top_p=2.0), "top_p"), (Sampling(n=9), "n")],
)
def test_the_child_answers_a_request_breaking_the_bounds_by_name_and_reads_on(
    pipe: tuple[Pipe, int, int], sampling: Sampling, field: str
) -> None:
    child, to_child, from_child = pipe
    bad = Generate(messages=[Message("user", "hi")], sampling=sampling, request_id=7)
    os.write(to_child, encode_frame(bad) + encode_frame(Unload()))

    assert child.read() == Unload()
    refused = _reply(from_child)
    assert isinstance(refused, RequestFailed)
    assert (refused.error_type, refused.request_id) == ("InvalidRequest", 7)
    assert f"$.sampling.{field}" in refused.message
