"""Sampling parameters are declared once (bus/sampling.py): the routed command and the task carry
exactly those fields, flat as the wire has them, and a chat's parameters reach its task unchanged."""

from __future__ import annotations

import msgspec
import pytest

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.sampling import Sampling, fields, sampling_of
from exojet.bus.tasks import ChatCompletion, ChatMessage


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
    sampling = Sampling(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("x", "y"))
    command = RouteChatCompletion(command_id="c", messages=hi, **fields(sampling))
    task = ChatCompletion(task_id="c.0", messages=hi, **fields(sampling_of(command)))
    assert sampling_of(task) == sampling
    wire = msgspec.json.decode(msgspec.json.encode(task))
    assert (wire["max_tokens"], wire["top_p"], wire["stop"]) == (7, 0.9, ["x", "y"])
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        msgspec.json.decode(b'{"messages": [], "max_tokens": 0}', type=Sampling)
