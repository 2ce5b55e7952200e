"""A conversation's next turn goes to the runner that was given its earlier turns (its engine
holds their cache), while that runner has a free slot; other chats go to the least loaded."""

from __future__ import annotations

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.bus.views import RunnerView
from exojet.projections.conversations import KEPT_PER_RUNNER, prefix_names, remember, reused_messages
from exojet.supervisor.planner import plan
from tests.planner_cluster import Cluster, ready_single

TURN_1 = (ChatMessage("system", "You are terse."), ChatMessage("user", "Name a colour."))
TURN_2 = (*TURN_1, ChatMessage("assistant", "Blue."), ChatMessage("user", "Another?"))


def _route(c: Cluster, command_id: str, messages: tuple[ChatMessage, ...], raw: bool = False) -> ChatCompletion:
    c.command(RouteChatCompletion(command_id=command_id, messages=messages, model_id="local/tiny", raw=raw))
    [task] = c.publish(plan(c.state))
    assert isinstance(task, ChatCompletion)
    return task


def _two_runners(capacity: int) -> tuple[Cluster, str, str]:
    c = Cluster()
    c.chat_capacity = capacity
    for r in ("r1", "r2"):
        c.register(r)
    return c, ready_single(c, "r1"), ready_single(c, "r2")


def test_the_next_turn_goes_where_the_last_was_served_even_if_that_runner_is_busier() -> None:
    c, a, b = _two_runners(capacity=4)
    first = _route(c, "t1", TURN_1)
    holder = first.instance_id
    c.complete("r1" if holder == a else "r2", first)
    unrelated = [_route(c, f"u{k}", (ChatMessage("user", f"unrelated {k}"),)).instance_id for k in range(3)]
    assert sorted(unrelated.count(i) for i in (a, b)) == [1, 2]  # each to the least loaded
    # Ties go to the lower instance id, so the holder now has two chats and the other one.
    assert c.state.instances[holder].chats_in_flight > c.state.instances[b if holder == a else a].chats_in_flight
    second = _route(c, "t2", TURN_2)
    assert second.instance_id == holder  # busier, but it holds turn 1 and has a free slot


def test_a_full_holder_is_passed_over_for_a_free_runner() -> None:
    c, a, b = _two_runners(capacity=1)
    first = _route(c, "t1", TURN_1)
    holder = first.instance_id  # turn 1 still running: its runner's one slot is taken
    second = _route(c, "t2", TURN_2)
    assert second.instance_id != holder and {first.instance_id, second.instance_id} == {a, b}


def test_a_runner_that_restarted_or_unloaded_holds_no_conversation() -> None:
    c, a, _ = _two_runners(capacity=2)
    first = _route(c, "t1", TURN_1)
    runner = "r1" if first.instance_id == a else "r2"
    assert c.state.runners[runner].conversations == [prefix_names(TURN_1)[-1]]
    c.register(runner)  # a new incarnation
    assert c.state.runners[runner].conversations == []


def test_raw_prompts_and_single_messages_name_no_conversation_to_continue() -> None:
    c, _, _ = _two_runners(capacity=2)
    _route(c, "raw", (ChatMessage("user", "Once upon"),), raw=True)
    assert all(not r.conversations for r in c.state.runners.values())
    runner = RunnerView(runner_id="r", conversations=[prefix_names(TURN_1)[-1]])
    assert reused_messages(runner, prefix_names(TURN_1)) == 0  # the same chat again is no continuation
    assert reused_messages(runner, prefix_names(TURN_2)) == len(TURN_1)


def test_a_runner_remembers_a_bounded_number_of_conversations_newest_last() -> None:
    runner = RunnerView(runner_id="r")
    for k in range(KEPT_PER_RUNNER + 5):
        remember(runner, (ChatMessage("user", f"chat {k}"),))
    remember(runner, (ChatMessage("user", f"chat {KEPT_PER_RUNNER}"),))  # again: moves to the end
    assert len(runner.conversations) == KEPT_PER_RUNNER
    assert runner.conversations[-1] == prefix_names((ChatMessage("user", f"chat {KEPT_PER_RUNNER}"),))[-1]
    assert len(set(runner.conversations)) == KEPT_PER_RUNNER


def test_every_prefix_has_its_own_name_and_the_same_messages_the_same_name() -> None:
    names = prefix_names(TURN_2)
    assert len(set(names)) == len(TURN_2)
    assert names[: len(TURN_1)] == prefix_names(TURN_1)
    assert (
        prefix_names((ChatMessage("user", "a"), ChatMessage("user", "b")))[-1]
        != prefix_names((ChatMessage("user", "ab"),))[-1]
    )
