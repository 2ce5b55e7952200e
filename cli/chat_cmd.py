"""`exojet chat`: send a ChatCompletion and stream the answer as it is generated."""

from __future__ import annotations

import sys
import uuid

from exojet.bus import client, subjects
from exojet.bus.codec import encode
from exojet.bus.query_client import QueryFailed, query
from exojet.bus.tasks import ChatCompletion, ChatMessage
from exojet.cli.log_cmds import wait_task
from exojet.cli.orchestration_cmds import ChatFailed, route_chat


def _ready_runner(reply: dict, wanted: str | None, model_id: str | None) -> str | None:
    """The named runner if Ready, else the Ready runner (with `model_id`) with the fewest tasks."""
    runners = reply["runners"]
    if wanted is not None:
        return wanted if runners.get(wanted, {}).get("status") == "RunnerReady" else None
    ready = [r for r in runners.values() if r["status"] == "RunnerReady" and model_id in (None, r["model_id"])]
    if not ready:
        return None
    load = {r["runner_id"]: 0 for r in ready}
    for task in reply["tasks"].values():
        if task["runner_id"] in load and task["status"] in ("Pending", "Running"):
            load[task["runner_id"]] += 1
    return min(sorted(load), key=lambda rid: load[rid])


async def _routed(
    nats_url: str, prompt: str, model_id: str | None, max_tokens: int, temperature: float, timeout: float
) -> int:
    try:
        async for text in route_chat(
            nats_url, (ChatMessage("user", prompt),), model_id, max_tokens, temperature, timeout
        ):
            print(text, end="", flush=True)
    except ChatFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"\nerror: no answer within {timeout} s", file=sys.stderr)
        return 1
    print()
    return 0


async def chat(
    nats_url: str,
    prompt: str,
    runner_id: str | None,
    model_id: str | None,
    max_tokens: int,
    temperature: float,
    timeout: float,
) -> int:
    """Stream the answer to `prompt`: routed by the supervisors to a Ready instance (of `model_id`),
    else sent to a Ready runner (the named one, or the least busy); non-zero when nothing is Ready."""
    nc = await client.connect(nats_url, name="exojet-chat")
    try:
        try:
            reply = await query(nc, "state")
        except QueryFailed as err:
            print(f"error: {err.code}: {err.message}", file=sys.stderr)
            return 1
        ready_instances = [
            i
            for i in reply.get("instances", {}).values()
            if i["status"] == "Ready" and model_id in (None, i["model_id"])
        ]
        if runner_id is None and ready_instances:
            await nc.close()
            return await _routed(nats_url, prompt, model_id, max_tokens, temperature, timeout)
        target = _ready_runner(reply, runner_id, model_id)
        if target is None:
            statuses = (
                ", ".join(f"{r['runner_id']} {r['status'].removeprefix('Runner')}" for r in reply["runners"].values())
                or "no runners"
            )
            who = f"runner {runner_id} is not" if runner_id else "no runner is"
            print(f"error: {who} Ready ({statuses}); start one with `exojet up`", file=sys.stderr)
            return 1
        task = ChatCompletion(
            task_id=f"chat-{uuid.uuid4().hex[:12]}",
            messages=(ChatMessage("user", prompt),),
            max_tokens=max_tokens,
            temperature=temperature,
        )
        js = nc.jetstream()
        ack = await client.publish(js, subjects.task_subject(target), encode(task), msg_id=task.task_id)
        assert task.task_id is not None
        return await wait_task(
            js, target, task.task_id, ack.seq, task.task_id, chat=True, timeout=timeout, verbose=False
        )
    finally:
        if not nc.is_closed:
            await nc.close()
