"""The soak's load (tests/test_soak.py): a stream of chats through the API with the official openai
client (some cancelled by their client after the first piece), and placements, deletions, drains
and undrains published as commands, each choice drawn from a seeded generator.

Every chat ends as `completed`, `cancelled` (by its client), `failed` (with the error's name) or
`hung` (no end within `CHAT_BOUND_S`: what the soak fails on).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

import openai
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from exojet.bus.commands import Command, DeleteInstance, DrainRunner, PlaceInstance, UndrainRunner
from testbed.hosts_harness import RUNNERS, Deployment, Fold
from tests.cutoff_harness import API_KEY

MODEL = "local/tiny"
# A chat ends, one way or another, within this (a fault delays it at most by the route wait,
# 30 s, a runner's loss, a re-placement and the chat run again; any more is a hang).
CHAT_BOUND_S = 180.0
# Chats in flight at most, and the pause between two started.
IN_FLIGHT = 6
CHAT_EVERY_S = (0.2, 1.5)
TOKENS = (8, 32, 128, 400)
# One chat in CANCEL_ONE_IN is closed by its client after its first piece.
CANCEL_ONE_IN = 8
OPS_EVERY_S = (6.0, 15.0)
PROBE_TOKENS = 8


@dataclass
class ChatRecord:
    """One chat as its client saw it."""

    n: int
    tokens: int
    started: float
    ended: float = 0.0
    outcome: str = ""
    error: str = ""
    chat_id: str | None = None
    text: str = ""
    # What the client said for a failure, when it ended (seconds into the run) and how far it got.
    detail: str = ""


def error_name(err: BaseException) -> str:
    """A chat's error as the API named it (status and type or code), or the client's exception."""
    if isinstance(err, openai.APIStatusError):
        return f"{err.status_code} {err.code or err.type or 'unnamed'}"
    if isinstance(err, openai.APIError) and not isinstance(err, openai.APIConnectionError):
        return f"stream error {err.code or err.type or 'unnamed'}"
    return type(err).__name__


class Load:
    """The chats and the commands sent while faults come and go."""

    def __init__(self, api_url: str, d: Deployment, nc: NATS, fold: Fold, seed: int) -> None:
        self.client = openai.AsyncOpenAI(base_url=f"{api_url}/v1", api_key=API_KEY, max_retries=0, timeout=CHAT_BOUND_S)
        self.d, self.nc, self.fold = d, nc, fold
        self.rng = random.Random(seed)
        self.chats: list[ChatRecord] = []
        self.ops: Counter[str] = Counter()
        self._in_flight: set[asyncio.Task[ChatRecord]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._op_n = 0

    async def chat(self, tokens: int, cancel: bool = False, record: bool = True) -> ChatRecord:
        """One streamed chat to its end (never raises: the outcome says how it ended)."""
        rec = ChatRecord(len(self.chats), tokens, time.monotonic())
        if record:
            self.chats.append(rec)
        try:
            async with asyncio.timeout(CHAT_BOUND_S):
                stream = await self.client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"count {rec.n}"}],
                    max_tokens=tokens,
                    temperature=0,
                    stream=True,
                )
                async for chunk in stream:
                    rec.chat_id = chunk.id
                    rec.text += "".join(c.delta.content or "" for c in chunk.choices)
                    if cancel:
                        await stream.close()  # the client goes away: the API cancels the chat
                        rec.outcome = "cancelled"
                        break
                else:
                    rec.outcome = "completed"
        except TimeoutError:
            rec.outcome = "hung"
        except openai.OpenAIError as err:
            rec.outcome, rec.error = "failed", error_name(err)
            cause = f" ({err.__cause__!r})" if err.__cause__ is not None else ""
            rec.detail = f"{err}{cause} after {len(rec.text)} characters"[:300]
        rec.ended = time.monotonic()
        return rec

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._chats()), asyncio.ensure_future(self._operations())]

    async def stop(self) -> None:
        """No new chats or commands; the chats under way run to their ends."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        if self._in_flight:
            await asyncio.wait(self._in_flight)
        await self.client.close()

    async def _pause(self, bounds: tuple[float, float]) -> bool:
        """The load's own pace (not a synchronisation); False once stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), self.rng.uniform(*bounds))
        except TimeoutError:
            return True
        return False

    async def _chats(self) -> None:
        while await self._pause(CHAT_EVERY_S):
            if len(self._in_flight) >= IN_FLIGHT:
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            cancel = self.rng.randrange(CANCEL_ONE_IN) == 0
            task = asyncio.ensure_future(self.chat(self.rng.choice(TOKENS), cancel))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _operations(self) -> None:
        """Place an extra instance or delete it; drain a runner or undrain it."""
        extra: str | None = None
        drained: str | None = None
        while await self._pause(OPS_EVERY_S):
            self._op_n += 1
            name = f"soak-op-{self._op_n}"
            if self.rng.random() < 0.5:
                op = "place" if extra is None else "delete"
                command: Command = (
                    PlaceInstance(command_id=name, model_id=MODEL)
                    if extra is None
                    else DeleteInstance(command_id=name, instance_id=extra)
                )
            else:
                op = "drain" if drained is None else "undrain"
                runner = drained or self.rng.choice(RUNNERS)
                command = (
                    DrainRunner(command_id=name, runner_id=runner)
                    if drained is None
                    else UndrainRunner(command_id=name, runner_id=runner)
                )
            if not await self._command(command, name, op):
                continue
            if op in ("place", "delete"):
                extra = f"inst-{name}" if op == "place" else None
            else:
                drained = runner if op == "drain" else None
        if drained is not None:
            await self._command(UndrainRunner(command_id="soak-undrain", runner_id=drained), "soak-undrain", "undrain")

    async def _command(self, command: Command, name: str, op: str) -> bool:
        """Publish a command; False (and counted by its error) when no server acknowledged it
        within the publish's own bound (a cluster without a quorum)."""
        try:
            await self.d.publish(self.nc, command, name)
        except (NatsError, TimeoutError) as err:
            self.ops[f"{op} not acknowledged ({type(err).__name__})"] += 1
            return False
        self.ops[op] += 1
        return True

    def hung(self) -> list[ChatRecord]:
        return [c for c in self.chats if c.outcome == "hung"]

    def failures(self) -> Counter[str]:
        return Counter(c.error for c in self.chats if c.outcome == "failed")
