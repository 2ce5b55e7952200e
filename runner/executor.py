"""The work each task names, on the engine child and the models dir. It changes
no status: `runner/task_loop.py` writes the transitions around it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from exojet.bus.results import DownloadResult, LoadResult, wire
from exojet.bus.tasks import (
    ChatCompletion,
    ConnectToGroup,
    DownloadModel,
    Group,
    LoadModel,
    Shard,
    StartWarmup,
    Task,
    UnloadModel,
    task_type,
)
from exojet.models.store import InvalidModelId, is_complete, layer_count, model_dir, size_on_disk
from exojet.runner import ring_identity
from exojet.runner.chat import Answer, chat
from exojet.runner.download import DownloadStatus, download_model
from exojet.runner.engine import Engine
from exojet.runner.engine_choice import EngineWanted
from exojet.runner.engine_protocol import LayersLoaded

GROUP_CONNECT_TIMEOUT_S = 30.0
# At most one LoadProgress per this many seconds (plus the first and the last layer's).
LOAD_PROGRESS_INTERVAL_S = 0.5
# How long a generation cut at its deadline may take to answer its Cancel (one token's time).
SETTLE_TIMEOUT_S = 5.0


class Executor:
    """What the runner holds between tasks (the engine child, the model it
    downloaded, the group it joined) and the work of each task."""

    def __init__(
        self,
        runner_id: str,
        nc: NATS,
        models_dir: Path,
        on_progress: Callable[[DownloadStatus], Awaitable[None]],
        on_load_progress: Callable[[str, str, int, int], Awaitable[None]],
        engine: EngineWanted = "auto",
    ) -> None:
        self.runner_id = runner_id
        self.nc = nc
        self.models_dir = models_dir
        self.on_progress = on_progress
        # (task_id, model_id, layers loaded, layers in all), throttled by `LoadThrottle`.
        self.on_load_progress = on_load_progress
        self.engine = Engine(engine)
        # This process's ring identity: its public key is registered, its seed never leaves it.
        self.ring_seed = ring_identity.new_seed()
        self.ring_key = ring_identity.public_key(self.ring_seed)
        self.downloaded: Shard | None = None
        self.group: Group | None = None
        # Chats the loaded model serves at once (1 with none loaded, and in a pipeline group:
        # its ranks pull their tasks independently, so they could not keep step).
        self.chat_capacity = 1

    def refusal(self, task: Task) -> tuple[str, str] | None:
        """(error_type, message) refusing the task before any transition, or None to run it."""
        if not isinstance(task, LoadModel):
            return None
        shard = task.shard or self.downloaded
        if shard is None:
            return (
                "ModelNotDownloaded",
                f"LoadModel names no model and runner {self.runner_id} has downloaded none: send DownloadModel first",
            )
        try:
            present = is_complete(model_dir(self.models_dir, shard.model_id))
        except (InvalidModelId, OSError):
            present = False
        if not present:
            return (
                "ModelNotDownloaded",
                f"model {shard.model_id} is not downloaded on runner {self.runner_id}: send DownloadModel first",
            )
        return None

    async def stop_engine(self) -> None:
        """End the engine child; a group lived in it, so it is gone too."""
        await self.engine.stop()
        self.group = None
        self.chat_capacity = 1

    async def settle(self, task: Task) -> bool:
        """After `task` was cut at its deadline: True if the engine serves on (a single
        runner's chat stops between two tokens); else the engine is stopped, as a
        stuck load or prefill cannot be interrupted in it, and the next task that needs
        one starts a fresh child."""
        if isinstance(task, ChatCompletion) and self.group is None and await self.engine.settle(SETTLE_TIMEOUT_S):
            return True
        if not isinstance(task, DownloadModel):
            await self.stop_engine()
        return False

    async def forget(self) -> None:
        """Hold nothing, as a new incarnation after a loss."""
        await self.stop_engine()
        self.downloaded = None

    async def chat(self, task: ChatCompletion, task_id: str, cancelled: asyncio.Event | None = None) -> Answer:
        """Answer a chat (beside others, up to `chat_capacity`); it stops once `cancelled` is set
        (its result's finish_reason then says "cancelled")."""
        return await chat(self.engine, self.nc, self.runner_id, self.group, task, task_id, cancelled)

    async def run(self, task: Task, task_id: str) -> dict[str, Any] | None:
        """Do the task's work (a chat's is `chat`); its result (for `Complete`) or an exception."""
        match task:
            case DownloadModel(shard=shard):
                path = await download_model(
                    shard.model_id, self.models_dir, revision=shard.revision, on_progress=self.on_progress
                )
                self.downloaded = shard
                # What placement needs, so no supervisor has to hold the model's files.
                facts = await asyncio.to_thread(lambda: (layer_count(path), size_on_disk(path)))
                downloaded = DownloadResult(
                    model_id=shard.model_id, path=str(path), n_layers=facts[0], size_bytes=facts[1]
                )
                return wire(downloaded)
            case ConnectToGroup(group=group):
                if self.engine.alive:
                    await self.engine.stop()
                await self.engine.start()
                connected = await self.engine.connect_group(
                    group.group_id,
                    group.world_size,
                    group.rank,
                    list(group.hosts),
                    GROUP_CONNECT_TIMEOUT_S,
                    self.ring_seed,
                    list(group.keys),
                )
                self.group = group
                return {
                    "group_id": group.group_id,
                    "rank": connected.rank,
                    "world_size": connected.world_size,
                    "signed": bool(group.keys),
                    "refused": connected.refused,
                }
            case LoadModel():
                return await self._load(task, task_id)
            case StartWarmup():
                await self.engine.warmup()
                return None
            case UnloadModel():
                # A child that joined a group cannot leave it: end it (a later
                # load starts a fresh one). A crashed child holds nothing.
                if self.group is not None or not self.engine.alive:
                    await self.stop_engine()
                else:
                    await self.engine.unload()
                self.chat_capacity = 1
                return None
        raise ValueError(f"{task_type(task)} has no work: the task loop handles it")

    async def _load(self, task: LoadModel, task_id: str) -> dict[str, Any]:
        wanted = task.shard or self.downloaded
        assert wanted is not None  # checked by `refusal`
        if not self.engine.alive:
            await self.engine.start()
        throttle = LoadThrottle(LOAD_PROGRESS_INTERVAL_S)

        async def on_layers(reply: LayersLoaded) -> None:
            if throttle.due(reply.done, reply.total, time.monotonic()):
                await self.on_load_progress(task_id, wanted.model_id, reply.done, reply.total)

        loaded = await self.engine.load(
            str(model_dir(self.models_dir, wanted.model_id)),
            wanted.start_layer,
            wanted.end_layer,
            on_layers=on_layers,
        )
        self.downloaded = wanted
        self.chat_capacity = loaded.chat_capacity if self.group is None else 1
        result = LoadResult(
            model_id=wanted.model_id,
            n_layers=loaded.n_layers,
            start_layer=loaded.start_layer,
            end_layer=loaded.end_layer,
            weights=loaded.weights,
            weights_reason=loaded.weights_reason,
            engine=loaded.engine,
            chat_capacity=self.chat_capacity,
            capabilities=loaded.capabilities,
            # Why this engine, when another crashed on this model (runner/engine_crashes.py).
            engine_reason=loaded.engine_reason or None,
        )
        return wire(result)


class LoadThrottle:
    """Which layer reports of one load to publish: the first, then at most one per
    `interval` seconds, and always the last (a 400-layer model must not flood the log)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_sent: float | None = None

    def due(self, done: int, total: int, now: float) -> bool:
        """Whether the report of `done` of `total` layers, at monotonic time `now`, goes out."""
        if done < total and self.last_sent is not None and now - self.last_sent < self.interval:
            return False
        self.last_sent = now
        return True
