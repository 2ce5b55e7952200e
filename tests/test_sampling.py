"""Sampling parameters are declared once (bus/sampling.py): the routed command and the task carry
exactly those fields, flat as the wire has them, and a chat's parameters reach its task unchanged."""

from __future__ import annotations

import msgspec
import pytest

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.sampling import Sampling, fields, sampling_of
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.bus.tools import AnswerShape, FunctionDef, Tool, ToolCall, shape_fields, shape_of


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
