"""Routing chats: each pending chat to a Ready instance of its model that can do what it asks, or
refused when none can (`CapabilityMissing`) or all are full (`QueueFull`).

Pure, like the planner that calls it.
"""

from __future__ import annotations

from exojet.bus import sampling
from exojet.bus.capabilities import Capabilities, missing, needed, words
from exojet.bus.chat_ends import CAPABILITY_MISSING, TOO_MANY_CHOICES
from exojet.bus.events import ChatRefused
from exojet.bus.ids import chat_task_id
from exojet.bus.tasks import ChatCompletion
from exojet.bus.tools import shape_fields, shape_of
from exojet.bus.views import InstanceView, RoutedChatView
from exojet.projections.conversations import prefix_names, reused_messages
from exojet.projections.instances import READY, instance_capabilities
from exojet.projections.placing import drained_placements
from exojet.projections.state import ClusterState
from exojet.supervisor.actions import Action, PlannerConfig, SendTask, WriteEvent


def chat_capacity(state: ClusterState, inst: InstanceView) -> int:
    """Chats an instance serves at once: its runner's capacity for the model; 1 for a pipeline
    group (its ranks pull their tasks independently, so they could not keep step)."""
    if len(inst.placements) != 1:
        return 1
    runner = state.runners.get(inst.placements[0].runner_id)
    return runner.chat_capacity if runner is not None else 1


def route_chats(state: ClusterState, config: PlannerConfig) -> list[Action]:
    """Each pending chat to a Ready instance of its model that states every capability it needs
    (refused when none does) with free capacity: the one whose runner
    was given the longest earlier turn of the same conversation (its engine holds that turn's
    cache), else the one with the most free capacity; with none free, to the one with the shortest
    queue, where it waits in its runner's queue (routed: an API waiting for it to be routed is
    answered at once), up to `max_chats_per_instance` waiting per instance; beyond that it is
    refused. A chat asking for `n` answers takes n of an instance's capacity, and is refused when
    n is more than every instance's capacity."""
    actions: list[Action] = []
    # An instance on a drained runner is given no new chat: it moves once its chats have ended.
    ready = [i for i in state.instances.values() if i.status == READY and not drained_placements(state, i)]
    load = {i.instance_id: i.chats_in_flight for i in ready}
    capacity = {i.instance_id: chat_capacity(state, i) for i in ready}
    for chat_id in state.pending_chats:
        chat = state.chats[chat_id]
        if chat.request is None:
            continue
        if chat.instance_id is None:
            of_model = [i for i in load if chat.model_id is None or state.instances[i].model_id == chat.model_id]
            if not of_model:
                continue  # waits for a Ready instance of its model
            need = needed(chat.request, chat.request)
            candidates = [
                i for i in of_model if not missing(need, instance_capabilities(state.runners, state.instances[i]))
            ]
            if not candidates:
                actions.append(_incapable(state, chat, of_model, need))
                continue
            n = sampling.choices(chat.request)
            if n > (most := max(capacity[i] for i in candidates)):
                actions.append(_refuse_choices(chat, n, most))
                continue
            target = _target(state, chat, candidates, load, capacity, n)
            if load[target] + n > capacity[target] + config.max_chats_per_instance:
                actions.append(_refuse(chat, len(candidates), config.max_chats_per_instance))
                continue
            load[target] += n
            actions.append(_chat_task(state, chat, state.instances[target], 0))
        elif (inst := state.instances.get(chat.instance_id)) is not None and inst.status == READY:
            # Ranks after 0 follow the instance that rank 0's task (in the log) names.
            actions.extend(
                _chat_task(state, chat, inst, rank)
                for rank in range(1, len(inst.placements))
                if chat_task_id(chat_id, rank) not in state.tasks
            )
    return actions


def _target(
    state: ClusterState,
    chat: RoutedChatView,
    candidates: list[str],
    load: dict[str, int],
    capacity: dict[str, int],
    n: int,
) -> str:
    """Of instances with `n` free slots, the one holding the longest earlier turn of the chat's
    conversation, then the least loaded; with none free, the shortest queue."""
    request = chat.request
    assert request is not None
    names = [] if request.raw else prefix_names(request.messages)

    def full(instance_id: str) -> bool:
        return load[instance_id] + n > capacity[instance_id]

    def reused(instance_id: str) -> int:
        if not names or full(instance_id):
            return 0
        runner = state.runners.get(state.instances[instance_id].placements[0].runner_id)
        return reused_messages(runner, names) if runner is not None else 0

    return min(candidates, key=lambda i: (full(i), -reused(i), load[i] - capacity[i], i))


def _refuse(chat: RoutedChatView, instances: int, limit: int) -> WriteEvent:
    model = chat.model_id or "any model"
    event = ChatRefused(
        event_id=f"{chat.chat_id}:refused",
        chat_id=chat.chat_id,
        error_type="QueueFull",
        reason=f"all {instances} Ready instance(s) of {model} serve as many chats as they can and {limit} "
        "more wait for each; retry shortly",
    )
    return WriteEvent(event)


def _refuse_choices(chat: RoutedChatView, n: int, most: int) -> WriteEvent:
    model = chat.model_id or "any model"
    event = ChatRefused(
        event_id=f"{chat.chat_id}:refused",
        chat_id=chat.chat_id,
        error_type=TOO_MANY_CHOICES,
        reason=f"n={n} answers are more than any Ready instance of {model} serves at once ({most}); ask for fewer",
    )
    return WriteEvent(event)


def _incapable(state: ClusterState, chat: RoutedChatView, instances: list[str], need: Capabilities) -> WriteEvent:
    """The chat needs what no Ready instance of its model states: refused, never sent to one that
    would ignore the fields it cannot do."""
    stated = []
    for instance_id in instances:
        inst = state.instances[instance_id]
        runners = ", ".join(p.runner_id for p in inst.placements)
        stated.append(f"{instance_id} (on {runners}) can do {words(instance_capabilities(state.runners, inst))}")
    event = ChatRefused(
        event_id=f"{chat.chat_id}:refused",
        chat_id=chat.chat_id,
        error_type=CAPABILITY_MISSING,
        reason=f"no instance of {chat.model_id or 'any model'} can do {words(need)}: " + "; ".join(stated),
    )
    return WriteEvent(event)


def _chat_task(state: ClusterState, chat: RoutedChatView, inst: InstanceView, rank: int) -> SendTask:
    request = chat.request
    assert request is not None
    task = ChatCompletion(
        task_id=chat_task_id(chat.chat_id, rank),
        instance_id=inst.instance_id,
        messages=request.messages,
        **sampling.fields(sampling.sampling_of(request)),
        **shape_fields(shape_of(request)),
        raw=request.raw,
        stream_id=chat.chat_id,
        emit_rank=0,
    )
    return SendTask(inst.placements[rank].runner_id, task)
