"""`exojet chat`: send a ChatCompletion and stream the answer as it is generated."""

from __future__ import annotations

import sys
import uuid

from bus import client, subjects
from bus.codec import encode
from bus.query_client import QueryFailed, query
from bus.tasks import ChatCompletion, ChatMessage
from cli.log_cmds import wait_task


def _ready_runner(reply: dict, wanted: str | None) -> str | None:
    """The named runner if Ready, else the Ready runner with the fewest tasks."""
    runners = reply["runners"]
    if wanted is not None:
        return wanted if runners.get(wanted, {}).get("status") == "RunnerReady" else None
    ready = [r for r in runners.values() if r["status"] == "RunnerReady"]
    if not ready:
        return None
    load = {r["runner_id"]: 0 for r in ready}
    for task in reply["tasks"].values():
        if task["runner_id"] in load and task["status"] in ("Pending", "Running"):
            load[task["runner_id"]] += 1
    return min(sorted(load), key=lambda rid: load[rid])


async def chat(nats_url: str, prompt: str, runner_id: str | None, max_tokens: int, temperature: float,
               timeout: float) -> int:
    """Stream the answer to `prompt` from a Ready runner; non-zero when none is Ready."""
    nc = await client.connect(nats_url, name="exojet-chat")
    try:
        try:
            reply = await query(nc, "state")
        except QueryFailed as err:
            print(f"error: {err.code}: {err.message}", file=sys.stderr)
            return 1
        target = _ready_runner(reply, runner_id)
        if target is None:
            statuses = ", ".join(f"{r['runner_id']} {r['status'].removeprefix('Runner')}"
                                 for r in reply["runners"].values()) or "no runners"
            who = f"runner {runner_id} is not" if runner_id else "no runner is"
            print(f"error: {who} Ready ({statuses}); start one with `exojet up`", file=sys.stderr)
            return 1
        task = ChatCompletion(task_id=f"chat-{uuid.uuid4().hex[:12]}", messages=(ChatMessage("user", prompt),),
                              max_tokens=max_tokens, temperature=temperature)
        js = nc.jetstream()
        ack = await client.publish(js, subjects.task_subject(target), encode(task), msg_id=task.task_id)
        assert task.task_id is not None
        return await wait_task(js, target, task.task_id, ack.seq, task.task_id, chat=True, timeout=timeout,
                               verbose=False)
    finally:
        await nc.close()
