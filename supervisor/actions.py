"""What the planner decides: its limits and the actions it returns (see supervisor/planner.py)."""

from __future__ import annotations

import msgspec

from exojet.bus.events import InstanceFailed, SupervisorEvent
from exojet.bus.tasks import Task
from exojet.bus.views import InstanceView


class PlannerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of the planner; every supervisor of a cluster should use the same."""

    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    # Group ports are taken from [port_base, port_base + port_count).
    port_base: int = 52_400
    port_count: int = 600
    # Routed chats that may wait in a Ready instance's runner queue beyond those it serves at
    # once; a chat no instance of its model has room for is refused (ChatRefused).
    max_chats_per_instance: int = 64


DEFAULT_CONFIG = PlannerConfig()


class SendTask(msgspec.Struct, frozen=True):
    runner_id: str
    task: Task


class WriteEvent(msgspec.Struct, frozen=True):
    event: SupervisorEvent
    # Expected last sequence of `exo.events.supervisor`, or None for no fence.
    fence: int | None = None


class RetryWait(msgspec.Struct, frozen=True):
    instance_id: str
    attempt: int
    delay: float


Action = SendTask | WriteEvent | RetryWait


def failed(inst: InstanceView, reason: str, final: bool, drained: bool = False) -> WriteEvent:
    """The instance's current attempt failed (`final`: no other is tried; `drained`: moved off a
    drained runner, no failure of its own)."""
    event = InstanceFailed(
        event_id=f"{inst.instance_id}:failed:{inst.attempt}",
        instance_id=inst.instance_id,
        reason=reason,
        attempt=inst.attempt,
        final=final,
        drained=drained,
    )
    return WriteEvent(event)
