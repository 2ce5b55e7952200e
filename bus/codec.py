"""JSON encoding and strict decoding; bad input becomes a named `BadInput`.

Decoders are built once: msgspec validates while it parses, so a typed decode
costs about what a bare `json.loads` does.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from exojet.bus.cancel import CancelTask
from exojet.bus.commands import Command, DrainRunner, PlaceInstance, RouteChatCompletion, UndrainRunner
from exojet.bus.events import Event
from exojet.bus.model_ids import model_id_problem
from exojet.bus.subjects import id_problem, stream_id_problem
from exojet.bus.tasks import ChatCompletion, DownloadModel, LoadModel, Task

# The log keeps whatever was published; these limits bound what we act on.
MAX_PAYLOAD_BYTES = 1024 * 1024

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
# Annotated: msgspec's stubs type a decoder of a union as Decoder[Any].
_task_decoder: msgspec.json.Decoder[Task] = msgspec.json.Decoder(Task)
_event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
_command_decoder: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
_cancel_decoder: msgspec.json.Decoder[CancelTask] = msgspec.json.Decoder(CancelTask)

_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


class BadInput(Exception):
    """A message we refuse: `error_type` names the kind, `message` says what and where."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


def encode(message: msgspec.Struct | dict[str, Any]) -> bytes:
    """Compact JSON bytes of a message."""
    return _encoder.encode(message)


def _type_names(union: Any) -> str:
    return ", ".join(t.__struct_config__.tag for t in union.__args__)


_KNOWN_TYPES = {
    "task": _type_names(Task),
    "event": _type_names(Event),
    "command": _type_names(Command),
    "cancel": "CancelTask",
}


def _classify(err: msgspec.ValidationError, what: str) -> BadInput:
    text = str(err)
    match = _AT_PATH.search(text)
    path = match.group("path") if match else ""
    detail = text[: match.start()] if match else text
    where = f" at `{path}`" if path else ""
    if "missing required field `type`" in detail and not path:
        return BadInput("MissingType", f"{what} has no `type` field")
    if path == "type" and detail.startswith("Invalid value"):
        got = detail.removeprefix("Invalid value ")
        return BadInput("UnknownType", f"unknown {what} type {got} (known: {_KNOWN_TYPES[what]})")
    if "missing required field" in detail:
        return BadInput("MissingField", f"{what} is missing a required field{where}: {detail}")
    if detail.startswith("Expected `object`") and not path:
        return BadInput("NotAnObject", f"{what} must be a JSON object: {detail}")
    return BadInput("InvalidField", f"{what} has an invalid field{where}: {detail}")


def _decode(decoder: msgspec.json.Decoder[T], data: bytes, what: str) -> T:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise BadInput("PayloadTooLarge", f"{what} is {len(data)} bytes, over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as err:
        raise _classify(err, what) from None
    except msgspec.DecodeError as err:
        raise BadInput("NotJson", f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        # msgspec raises it, not a DecodeError, for JSON nested deeper than it recurses.
        raise BadInput("TooDeeplyNested", f"{what} nests arrays or objects too deeply to decode") from None


def _check_model_id(model_id: str | None) -> None:
    if model_id is not None and (problem := model_id_problem(model_id)):
        raise BadInput("InvalidModelId", problem)


def _check_stream_id(value: str | None, field: str) -> None:
    if value is not None and (problem := stream_id_problem(value)):
        raise BadInput("InvalidField", f"`{field}` {problem}")


def decode_task(data: bytes) -> Task:
    """A task from JSON bytes, or BadInput (shape, types, size, model id)."""
    task = _decode(_task_decoder, data, "task")
    match task:
        case DownloadModel(shard=shard):
            _check_model_id(shard.model_id)
        case LoadModel(shard=shard) if shard is not None:
            _check_model_id(shard.model_id)
        case ChatCompletion(task_id=task_id, stream_id=stream_id):
            # Its chunks go to `exo.chunks.<runner>.<stream id>`: the id must make subject tokens.
            _check_stream_id(stream_id or task_id, "stream_id" if stream_id else "task_id")
    return task


def decode_event(data: bytes) -> Event:
    """An event from JSON bytes, or BadInput."""
    # The fast path of a rebuild (hundreds of thousands of events): one call
    # for a good event; the general path below names what is wrong with a bad one.
    if len(data) <= MAX_PAYLOAD_BYTES:
        try:
            return _event_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            pass
    return _decode(_event_decoder, data, "event")


def decode_command(data: bytes) -> Command:
    """A supervisor command from JSON bytes, or BadInput."""
    command = _decode(_command_decoder, data, "command")
    match command:
        case PlaceInstance(model_id=model_id):
            _check_model_id(model_id)
        case RouteChatCompletion(model_id=model_id, command_id=command_id):
            _check_model_id(model_id)
            # The chat's chunks go to `exo.chunks.<runner>.chat-<command id>`.
            _check_stream_id(command_id, "command_id")
        case DrainRunner(runner_id=runner_id) | UndrainRunner(runner_id=runner_id):
            if problem := id_problem(runner_id):
                raise BadInput("InvalidField", problem)
    return command


def decode_cancel(data: bytes) -> CancelTask:
    """A cancel from JSON bytes, or BadInput."""
    cancel: CancelTask = _decode(_cancel_decoder, data, "cancel")
    return cancel
