"""A routed chat on a pipeline instance of two runners, cancelled while it generates: every rank
stops at the same token, even when the cancel reaches one rank only, and the ring serves on."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.cancel import CancelTask
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.ids import chat_id_of, chat_task_id
from exojet.bus.nats import client
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import ChatMessage
from testbed.log_watcher import LogWatch
from tests.cluster_procs import Procs, ready_pipeline_instance

pytestmark = pytest.mark.timeout(180)
# Far more tokens than any machine generates before the cancel: the chat only ends by it.
ENDLESS = 1_000_000


async def _route(nc: NATS, max_tokens: int) -> str:
    chat = RouteChatCompletion(messages=(ChatMessage("user", "Tell me a long story"),), max_tokens=max_tokens)
    ack = await client.publish(nc.jetstream(), subjects.COMMANDS, chat)
    return chat_id_of(None, ack.seq)


async def test_a_cancel_on_one_rank_ends_both_at_the_same_token(
    procs: Procs,
    watch: LogWatch,
    nc: NATS,
) -> None:
    instance_id = await ready_pipeline_instance(procs, watch, nc)
    # The ring's ranks proved who they are with the keys their runners registered.
    connects = [t for t in watch.state.tasks.values() if t.task_type == "ConnectToGroup"]
    assert len(connects) == 2 and all(t.result and t.result["signed"] for t in connects)

    chat_id = await _route(nc, ENDLESS)
    ranks = [chat_task_id(chat_id, rank) for rank in (0, 1)]
    await watch.until(
        lambda s: all(r in s.tasks and s.tasks[r].status == TaskStatus.RUNNING for r in ranks), 60, "both ranks Running"
    )
    # Only rank 1's runner is told, as when the other cancel is late or lost.
    rank1 = watch.state.tasks[ranks[1]].runner_id
    await client.publish(
        nc.jetstream(), subjects.cancel_subject(rank1), CancelTask(task_id=ranks[1], reason="test cancel")
    )
    state = await watch.until(
        lambda s: all(s.tasks[r].status == TaskStatus.CANCELLED for r in ranks), 60, "both ranks Cancelled"
    )
    first, second = (state.tasks[r] for r in ranks)
    assert first.result is not None and second.result is not None
    assert first.result["finish_reason"] == second.result["finish_reason"] == "cancelled"
    assert first.result["completion_tokens"] == second.result["completion_tokens"] > 0
    assert second.error_message == "test cancel"
    assert first.error_message == "another rank of its group was cancelled"

    # The instance is still Ready and its ring still in lockstep: the next chat completes on both ranks.
    assert state.instances[instance_id].status == "Ready"
    after = [chat_task_id(await _route(nc, 8), rank) for rank in (0, 1)]
    state = await watch.until(
        lambda s: all(r in s.tasks and s.tasks[r].status == TaskStatus.COMPLETE for r in after), 60, "next chat"
    )
    assert state.tasks[after[0]].result["completion_tokens"] == state.tasks[after[1]].result["completion_tokens"]
