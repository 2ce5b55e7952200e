"""A chat cancelled before any rank of it runs: the cancel is a command in the log
(`CancelChat`), so no supervisor routes the chat later, however late it comes."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS

from exojet.api.chat_request import parse_chat
from exojet.api.errors import ApiError
from exojet.api.gateway import Gateway
from exojet.bus.commands import CancelChat, RouteChatCompletion
from exojet.bus.nats.chat_session import ChatSession
from exojet.bus.tasks import ChatMessage
from exojet.supervisor.planner import plan
from testbed.log_watcher import LogWatch
from tests.planner_cluster import Cluster, ready_single

pytestmark = pytest.mark.timeout(60)
HI = (ChatMessage("user", "hi"),)


def test_a_pending_chat_cancelled_is_never_routed_and_a_routed_one_is_left_to_its_ranks() -> None:
    c = Cluster()
    for r in ("r1", "r2"):
        c.register(r)
    ready_single(c, "r1")
    c.command(RouteChatCompletion(command_id="x", messages=HI, model_id="local/nowhere"))
    c.command(CancelChat(chat_id="chat-x", reason="client disconnected"))
    assert c.state.chats["chat-x"].status == "Cancelled" and not c.state.pending_chats
    # An instance of its model comes Ready: still nothing to route.
    ready_single(c, "r2", model="local/nowhere")
    assert [a for a in plan(c.state) if "chat-x" in repr(a)] == []
    c.command(RouteChatCompletion(command_id="y", messages=HI, model_id="local/tiny"))
    [routed] = c.publish(plan(c.state))
    c.command(CancelChat(chat_id="chat-y"))
    assert routed.task_id == "chat-y.0" and c.state.chats["chat-y"].status == "Routed"
    # A cancel of a chat never requested is an anomaly, not an exception.
    c.command(CancelChat(chat_id="chat-nobody"))
    assert c.state.anomalies[-1].kind == "UnknownChat"


async def test_the_api_cancels_through_the_log_what_it_could_not_route(nc: NATS) -> None:
    # The log folded as a supervisor folds it: one that comes back late routes what is pending.
    watch = LogWatch()
    await watch.start(nc)
    gateway = Gateway(ChatSession(nc, route_timeout=0.5))
    await gateway.start()
    request = parse_chat(b'{"model": "local/tiny", "messages": [{"role": "user", "content": "hi"}]}', 1024)
    try:
        # No supervisor routes it: the request fails (the API's 503) and is closed.
        timed_out = await gateway.open_chat()
        with pytest.raises(ApiError) as err:
            await gateway.submit(timed_out, request)
        assert err.value.status == 503
        gateway.close(timed_out, "the request failed before its chat was routed")
        assert not timed_out.subs  # its chunks' subscription goes with the request, not a minute later
        # Another is cancelled (POST /v1/cancel) while it waits to be routed.
        gateway.session.route_timeout = 30.0
        waiting = await gateway.open_chat()
        submitted = asyncio.create_task(gateway.submit(waiting, request))
        await watch.until(lambda s: waiting.chat_id in s.chats, 10, "the chat requested")
        assert await gateway.cancel(waiting.chat_id, "cancelled through POST /v1/cancel") == {}
        with pytest.raises(ApiError) as err:
            await submitted
        assert err.value.status == 409
    finally:
        await gateway.stop()
    chats = (timed_out.chat_id, waiting.chat_id)
    state = await watch.until(
        lambda s: all(c in s.chats and s.chats[c].status == "Cancelled" for c in chats), 10, "both chats Cancelled"
    )
    # A supervisor folding this log, whenever it comes, has nothing to route.
    assert not state.pending_chats
