"""A chat asking for `n` answers takes n of its instance's chat capacity, in the router and the fold,
and one asking for more than any instance serves at once is refused by name (the API's 400)."""

from __future__ import annotations

from exojet.bus.chat_ends import TOO_MANY_CHOICES, ChatTooManyChoices, refusal
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.tasks import ChatMessage
from exojet.supervisor.actions import PlannerConfig, WriteEvent
from exojet.supervisor.planner import plan
from tests.planner_cluster import Cluster, ready_single

HI = (ChatMessage("user", "hi"),)


def _cluster(*runners: str) -> tuple[Cluster, list[str]]:
    """Runners of chat capacity 4, each with a Ready instance of local/tiny (their ids)."""
    c = Cluster()
    c.chat_capacity = 4
    for r in runners:
        c.register(r)
    return c, [ready_single(c, r) for r in runners]


def test_n_answers_take_n_slots_and_free_them_when_the_chat_ends() -> None:
    c, (a, b) = _cluster("r1", "r2")
    c.command(RouteChatCompletion(command_id="x", messages=HI, model_id="local/tiny", n=3))
    c.command(RouteChatCompletion(command_id="y", messages=HI, model_id="local/tiny", n=2))
    c.command(RouteChatCompletion(command_id="z", messages=HI, model_id="local/tiny"))

    x, y, z = c.publish(plan(c.state))

    assert x.n == 3 and y.n == 2
    # 3 on one, then the 2 fit only on the other, the least loaded then (2 of 4 against 3 of 4).
    assert x.instance_id != y.instance_id and z.instance_id == y.instance_id
    assert c.state.instances[x.instance_id].chats_in_flight == 3
    assert c.state.instances[y.instance_id].chats_in_flight == 3
    c.complete("r1" if x.instance_id == a else "r2", x)
    assert c.state.instances[x.instance_id].chats_in_flight == 0
    c.command(RouteChatCompletion(command_id="w", messages=HI, model_id="local/tiny", n=4))
    [w] = c.publish(plan(c.state))
    assert w.instance_id == x.instance_id  # the only one with 4 free slots
    assert {a, b} == {x.instance_id, y.instance_id}


def test_more_answers_than_any_instance_serves_at_once_are_refused_by_name() -> None:
    c, _ = _cluster("r1")
    c.command(RouteChatCompletion(command_id="x", messages=HI, model_id="local/tiny", n=5))

    actions = plan(c.state, config=PlannerConfig(max_chats_per_instance=8))

    [refused] = [a.event for a in actions if isinstance(a, WriteEvent)]
    assert refused.error_type == TOO_MANY_CHOICES
    assert "n=5" in refused.reason and "(4)" in refused.reason
    error = refusal(refused.chat_id, refused.error_type, refused.reason)
    assert isinstance(error, ChatTooManyChoices)
    c.publish(actions)
    assert c.state.chats["chat-x"].status == "Refused"
