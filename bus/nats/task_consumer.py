"""A runner's task queue: the durable pull consumer on `exo.tasks.<runner_id>`.

nats-py's `fetch(timeout=...)` waits with `asyncio.wait_for(queue.get())`, which
on Python 3.11 can drop a message that arrives just as the timeout fires; the
server then sees it unacked and redelivers it only after `ack_wait` (a 30 s
stall). Here delivery goes into our own deque from the subscription callback,
and the wait is on an Event, so no message can be lost between the two.
"""

from __future__ import annotations

import asyncio
import collections
import json

from loguru import logger
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from exojet.bus import streams
from exojet.bus.nats import client, connection, stream_setup

# Status codes the server answers a pull request with when it ends without a message.
_REQUEST_ENDED = {"404", "408", "409"}


class TaskConsumer:
    """`await next()` gives the runner's next task message (ack, nak, term it yourself)."""

    def __init__(self, nc: NATS, runner_id: str, expires_s: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.runner_id = runner_id
        self.expires_s = expires_s
        self.durable = stream_setup.task_consumer_config(runner_id).durable_name
        self._queue: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._outstanding = False
        # Requests refused in a row (no answer but an error status).
        self._refused = 0

    async def start(self) -> TaskConsumer:
        """Create (or update) the durable consumer and listen on our inbox."""
        # A server cut off or electing a leader answers with a timeout: ask until one answers.
        await client.until_done(
            lambda: self.js.add_consumer(streams.LOG_STREAM, config=stream_setup.task_consumer_config(self.runner_id)),
            f"create the task consumer of {self.runner_id}",
        )
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        connection.watch(self.nc).on_reconnect(self._ask_again)
        return self

    def _ask_again(self) -> None:
        # A request in flight when the connection went is lost with it: ask again at once.
        self._outstanding = False
        self._arrived.set()

    async def _on_msg(self, msg: Msg) -> None:
        self._queue.append(msg)
        self._arrived.set()

    async def next(self) -> Msg:
        """The next task message; waits as long as it takes."""
        while True:
            while self._queue:
                msg = self._queue.popleft()
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None:
                    self._outstanding = False
                    self._refused = 0
                    return msg
                if status in _REQUEST_ENDED:
                    self._outstanding = False
                    self._refused = 0
                elif status != "100":  # 100 is an idle heartbeat
                    # 503: the consumer has no leader (a cluster electing one). Said once;
                    # asked again after a backoff, or the loop would spin until it has one.
                    self._refused += 1
                    (logger.warning if self._refused == 1 else logger.debug)(
                        f"runner {self.runner_id}: pull request answered {status} "
                        f"{headers.get('Description', '')}; asking again until the consumer answers"
                    )
                    self._outstanding = False
            if not self._outstanding:
                if self._refused:
                    await asyncio.sleep(connection.backoff_delay(self._refused - 1))
                request = {"batch": 1, "expires": int(self.expires_s * 1e9)}
                await self.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{streams.LOG_STREAM}.{self.durable}",
                    json.dumps(request).encode(),
                    reply=self._inbox,
                )
                self._outstanding = True
            self._arrived.clear()
            try:
                # The server always answers a request by its expiry; past that
                # (a reconnect lost it) ask again. asyncio.timeout, not wait_for:
                # on 3.11 wait_for drops a cancel that lands as the event is set,
                # and this loop would then never end (a runner deaf to SIGTERM).
                async with asyncio.timeout(self.expires_s + 2.0):
                    await self._arrived.wait()
            except TimeoutError:
                self._outstanding = False

    async def stop(self) -> None:
        connection.watch(self.nc).remove_listener(self._ask_again)
        if self._sub is not None:
            await self._sub.unsubscribe()
