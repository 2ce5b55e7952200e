"""Ids that follow from the log: an instance's, a routed chat's, their tasks'.

Every part spells them (the projection, the planner, the API, the CLI, the benches), so they
live in the lowest part all of them may import.
"""

from __future__ import annotations


def instance_id_of(command_id: str | None, seq: int) -> str:
    """The instance a PlaceInstance command creates."""
    return f"inst-{command_id or seq}"


def chat_id_of(command_id: str | None, seq: int) -> str:
    """The routed chat a RouteChatCompletion command creates (also its chunk stream id)."""
    return f"chat-{command_id or seq}"


def step_task_id(instance_id: str, attempt: int, step: str, runner_id: str) -> str:
    """The deterministic id of one step's task on one runner (also its Nats-Msg-Id)."""
    return f"{instance_id}.a{attempt}.{step}.{runner_id}"


def chat_task_id(chat_id: str, rank: int) -> str:
    """The id of a routed chat's task for `rank`: the same whichever instance serves it,
    so two supervisors routing the same chat differently are deduplicated by the stream."""
    return f"{chat_id}.{rank}"
