"""The API's NATS side: its chat session (`bus/nats/chat_session.py`) and the supervisors' view.

One gateway per API process: the chats of every request in flight go through one
`ChatSession`, whose ends (`bus/chat_ends.py`) are mapped here to the API's errors; the
cluster view (which models are served) is asked of the supervisors and reused a moment.
The gateway keeps no other state: several API processes may serve the same cluster.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from exojet.api.chat_request import ChatRequest
from exojet.api.errors import ApiError, unavailable
from exojet.bus import sampling
from exojet.bus.chat_ends import (
    INVALID_STATE,
    KV_CACHE_FULL,
    REQUEST_REFUSALS,
    ChatCancelled,
    ChatError,
    ChatIncapable,
    ChatLost,
    ChatNotRouted,
    ChatQueueFull,
    ChatTooManyChoices,
    ChatUnfinished,
)
from exojet.bus.commands import RouteChatCompletion
from exojet.bus.nats.chat_session import ChatSession
from exojet.bus.nats.chat_stream import ChatStream
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.replies import StateReply
from exojet.bus.tools import shape_fields

# How long the cluster view used for model checks and /v1/models is reused.
STATE_TTL_S = 1.0
# A chat for a model Ready in a view this young goes ahead without asking the supervisors
# again (the view is refreshed beside it): a query is a round trip on a chat's first token.
READY_VIEW_S = 5.0
# The largest page a supervisor answers (projections/queries.py): instances beyond it
# (ended ones, listed last) do not matter to the API.
INSTANCES_PAGE = 500


def api_error(err: ChatError) -> ApiError:
    """The API's answer to a chat that ended without one."""
    detail = str(err)
    match err:
        case ChatUnfinished(status="Cancelled") | ChatCancelled():
            return ApiError(409, detail, type="cancelled", code="cancelled")
        case ChatUnfinished(status="TimedOut"):
            return ApiError(504, detail, type="server_error", code="timed_out")
        case ChatUnfinished(error_type=error_type) if error_type in REQUEST_REFUSALS:
            return ApiError(400, detail, type="invalid_request_error", code=error_type)
        case ChatIncapable():
            return ApiError(400, err.detail, type="invalid_request_error", code="CapabilityMissing")
        case ChatUnfinished(error_type=error_type) if error_type == KV_CACHE_FULL:
            # Capacity, not the request: 503 with Retry-After, which OpenAI's and Anthropic's clients retry.
            return unavailable(detail, "kv_cache_full", retry_after=1)
        case ChatUnfinished(error_type=error_type) if error_type == INVALID_STATE:
            # Routed to a runner that had meanwhile lost its model (found by the hour's soak: a runner
            # cut off, declared lost, back as a new incarnation): another try is routed afresh.
            return unavailable(detail, "runner_not_ready", retry_after=1)
        case ChatUnfinished(error_type=error_type):
            return ApiError(500, detail, type="server_error", code=error_type)
        case ChatTooManyChoices():
            return ApiError(400, err.detail, type="invalid_request_error", param="n", code="too_many_choices")
        case ChatQueueFull():
            return ApiError(
                429, err.detail, type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}
            )
        case ChatLost():
            return unavailable(detail, "runner_lost", retry_after=1)
        case ChatNotRouted():
            return unavailable(detail, "not_routed")
    return ApiError(500, detail, type="server_error", code="chat_error")


class Gateway:
    """The API process's connection to the cluster (see the module docstring)."""

    def __init__(self, session: ChatSession) -> None:
        self.nc = session.nc
        self.session = session
        self._background: set[asyncio.Task[Any]] = set()
        self._state: StateReply | None = None
        self._state_at = 0.0
        self._refreshing = False

    async def start(self) -> None:
        await self.session.start()

    async def stop(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.session.stop()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # -- the cluster view ---------------------------------------------------

    async def cluster(self, fresh: bool = False) -> StateReply:
        """The supervisors' live instances (reused for STATE_TTL_S); ApiError(503) when none answers."""
        now = time.monotonic()
        if fresh or self._state is None or now - self._state_at > STATE_TTL_S:
            # Instances only, live ones first: all an API needs to know what is served.
            state = await self._query_state(["instances"])
            self._state, self._state_at = state, time.monotonic()
            return state
        return self._state

    async def cluster_runners(self) -> StateReply:
        """The supervisors' live instances and runners, fresh (what each runner states it can do);
        ApiError(503) when none answers."""
        return await self._query_state(["instances", "runners"])

    async def _query_state(self, sections: list[str]) -> StateReply:
        try:
            return await query(self.nc, "state", timeout=2.0, sections=sections, limit=INSTANCES_PAGE)
        except QueryFailed as err:
            raise unavailable(f"{err.code}: {err.message}", "no_supervisor") from None

    def recent_view(self) -> StateReply | None:
        """The last cluster view if at most READY_VIEW_S old (a fresh one is asked for
        beside it once it is older than STATE_TTL_S), else None."""
        age = time.monotonic() - self._state_at
        if self._state is None or age > READY_VIEW_S:
            return None
        if age > STATE_TTL_S and not self._refreshing:
            self._refreshing = True
            self._spawn(self._refresh())
        return self._state

    async def _refresh(self) -> None:
        try:
            await self.cluster(fresh=True)
        except ApiError:
            pass  # the next request that needs the view asks, and answers 503 itself
        finally:
            self._refreshing = False

    # -- chats --------------------------------------------------------------

    async def open_chat(self) -> ChatStream:
        return await self.session.open_chat()

    async def submit(self, stream: ChatStream, req: ChatRequest) -> None:
        """Publish the chat's RouteChatCompletion and wait until a supervisor routed it (ApiError if not)."""
        command = RouteChatCompletion(
            command_id=stream.command_id,
            messages=req.messages,
            model_id=req.model,
            **sampling.fields(req.sampling),
            **shape_fields(req.shape),
            raw=req.raw,
        )
        try:
            await self.session.submit(stream, command)
        except ChatError as err:
            raise api_error(err) from None

    def close(self, stream: ChatStream, reason: str) -> None:
        """The HTTP side is done with `stream` (see ChatSession.close)."""
        self.session.close(stream, reason)

    async def cancel(self, chat_id: str, reason: str) -> dict[str, str] | None:
        """Cancel every rank of `chat_id`; the tasks asked (id -> runner), None if the chat is unknown."""
        try:
            return await self.session.cancel(chat_id, reason)
        except QueryFailed as err:
            raise unavailable(f"{err.code}: {err.message}", "no_supervisor") from None

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
