"""`exojet up`'s instance: placed on its runner, followed to Ready, and served again
each time the runner comes back as a new incarnation.

A runner that restarts registers a new incarnation; the supervisor's planner then
fails the instance's attempt ("runner restarted") and places it again on the new
incarnation (an instance that was Ready, however often; one that never got Ready, up
to `--max-attempts` in a row). Past those the instance has given up: `up` places a new
one, since its runner only ever serves `up`'s instance.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import NoReturn

from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.commands import DeleteInstance, PlaceInstance
from exojet.bus.envelope import Envelope
from exojet.bus.events import RunnerRegistered, RunnerStatusUpdated
from exojet.bus.ids import instance_id_of
from exojet.bus.nats import client
from exojet.bus.nats.query_client import QueryFailed, first_answer, query
from exojet.bus.statuses import RunnerFailed, status_name
from exojet.bus.views import InstanceView
from exojet.cli.progress import ProgressBars
from exojet.projections.words import message_of

# Download, load and warm-up of the default model take seconds; a first download from a hub may not.
READY_TIMEOUT_S = 600.0


class InstanceLost(RuntimeError):
    """`up`'s instance ended (failed for good, or deleted) and could not be served again."""


class Serving:
    """The instance `up` serves now (a new one once the last ended)."""

    def __init__(self) -> None:
        self.instance_id: str | None = None


class Watcher:
    """Prints the runner's transitions as they land in the log (with progress bars on a terminal)."""

    def __init__(self, runner_id: str) -> None:
        self.runner_id = runner_id
        self.bars = ProgressBars(sys.stdout)
        self.status = "Unregistered"
        self.incarnation = 0
        self.registered_seq = 0
        self._changed = asyncio.Event()

    def on_event(self, env: Envelope) -> None:
        self.bars.on_event(env)
        match message_of(env):
            case RunnerRegistered(incarnation=inc, pid=pid):
                self.incarnation = inc
                self.registered_seq = env.seq
                self.status = "Unregistered"  # a new incarnation starts afresh
                self.bars.say(f"  runner {self.runner_id} registered (incarnation {inc}, pid {pid})")
            case RunnerStatusUpdated(runner_status=status):
                new = status_name(status)
                why = f": {status.error_message}" if isinstance(status, RunnerFailed) else ""
                self.bars.say(
                    f"  {self.runner_id}: {self.status.removeprefix('Runner')} -> {new.removeprefix('Runner')}{why}"
                )
                self.status = new
        self._changed.set()

    async def changed(self, timeout: float | None = 1.0) -> None:
        """Until the runner writes again (or `timeout`, so the caller re-checks the projection)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def registered_after(self, incarnation: int) -> None:
        """Until the runner registers an incarnation newer than `incarnation`."""
        while self.incarnation <= incarnation:
            await self.changed(timeout=None)


async def drive(nc: NATS, watcher: Watcher, model_id: str, serving: Serving) -> bool:
    """Place `model_id` on the watched runner and follow it to Ready (False if it ended instead)."""
    runner_id = watcher.runner_id
    await asyncio.wait_for(watcher.registered_after(0), 60)
    # This runner serves our instance only: retire what an earlier `up` left on it.
    await first_answer(nc, min_seq=watcher.registered_seq)
    mine = await query(nc, "runner", runner_id=runner_id, min_seq=watcher.registered_seq)
    for inst in mine.instances.values():
        await client.publish_until_stored(
            nc.jetstream(),
            subjects.COMMANDS,
            DeleteInstance(instance_id=inst.instance_id),
            msg_id=f"up-delete-{inst.instance_id}-{uuid.uuid4().hex[:6]}",
        )
    serving.instance_id, placed_seq = await _place(nc, watcher, model_id)
    inst = await _until_ready(nc, watcher, serving.instance_id, placed_seq)
    if inst.status != "Ready":
        print(f"error: {serving.instance_id} {inst.status}: {inst.reason}", file=sys.stderr)
        return False
    return True


async def keep_serving(nc: NATS, watcher: Watcher, model_id: str, serving: Serving) -> NoReturn:
    """Each time the runner comes back, follow the instance to Ready on the new incarnation
    (placing a new one if it ended); raises InstanceLost if a new one ends too."""
    assert serving.instance_id is not None
    served = watcher.incarnation
    while True:
        await watcher.registered_after(served)
        # Bars for this comeback's load (the last ones were stopped once Ready).
        watcher.bars = ProgressBars(sys.stdout)
        watcher.bars.say(f"  runner {watcher.runner_id} is back: serving {serving.instance_id} again")
        inst = await _until_ready(nc, watcher, serving.instance_id, watcher.registered_seq)
        if inst.status != "Ready":
            watcher.bars.say(f"  {serving.instance_id} {inst.status}: {inst.reason}; placing a new instance")
            serving.instance_id, placed_seq = await _place(nc, watcher, model_id)
            inst = await _until_ready(nc, watcher, serving.instance_id, placed_seq)
            if inst.status != "Ready":
                raise InstanceLost(f"{serving.instance_id} {inst.status}: {inst.reason}")
        watcher.bars.stop()
        served = watcher.incarnation
        print(f"Ready again: {serving.instance_id} on runner {watcher.runner_id} (incarnation {served})", flush=True)


async def _place(nc: NATS, watcher: Watcher, model_id: str) -> tuple[str, int]:
    """Ask the supervisors for an instance of `model_id` on the runner; its id and the command's sequence."""
    # The planner drives DownloadModel -> LoadModel -> StartWarmup; we watch.
    command_id = f"up-{watcher.runner_id}-{watcher.incarnation}-{uuid.uuid4().hex[:6]}"
    ack = await client.publish_until_stored(
        nc.jetstream(),
        subjects.COMMANDS,
        PlaceInstance(command_id=command_id, model_id=model_id, runners=(watcher.runner_id,)),
        msg_id=command_id,
    )
    instance_id = instance_id_of(command_id, ack.seq)
    watcher.bars.say(f"  placed {instance_id}: {model_id} on {watcher.runner_id}")
    return instance_id, ack.seq


async def _until_ready(nc: NATS, watcher: Watcher, instance_id: str, min_seq: int) -> InstanceView:
    """The instance once Ready on the runner's current incarnation, or once ended (failed for good, deleted)."""
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            try:
                inst = (await query(nc, "instance", instance_id=instance_id, min_seq=min_seq)).instance
            except QueryFailed as err:
                # NATS or the supervisor away for a moment: ask again once it is back.
                print(f"  waiting for the supervisor ({err})", flush=True)
                await watcher.changed()
                continue
            current = all(p.incarnation == watcher.incarnation for p in inst.placements)
            if inst.status == "Ready" and current:
                return inst
            # A failed attempt the supervisor will retry is not an end.
            if inst.status == "Deleted" or (inst.status == "Failed" and inst.gave_up):
                return inst
            await watcher.changed()
