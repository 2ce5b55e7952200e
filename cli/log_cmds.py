"""`exojet task`, `exojet state`, `exojet replay`: publish, query, and read the log."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from exojet.bus import streams, subjects
from exojet.bus.codec import BadInput, decode_task
from exojet.bus.envelope import Envelope
from exojet.bus.events import TaskStatusUpdated
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.chunk_order import read_chunks
from exojet.bus.nats.follower import Follower
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.bus.ops.archive import ArchiveError, ArchiveWriter, replay_archive
from exojet.bus.statuses import TERMINAL_TASK_STATUSES, TaskStatus
from exojet.bus.tasks import ChatCompletion
from exojet.cli.html_report import DEFAULT_MAX_BYTES, HtmlReport
from exojet.cli.render import render_instance, render_runner, render_state, render_task
from exojet.cli.timeline import timeline_line
from exojet.projections.apply import apply
from exojet.projections.checks import check
from exojet.projections.explain import Explainer, UnknownId
from exojet.projections.queries import Paging, state_reply
from exojet.projections.state import ClusterState
from exojet.projections.words import describe, envelope_json, message_of, task_id_of


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


async def publish_task(nats_url: str, runner_id: str, payload: str, wait: bool, timeout: float) -> int:
    """Validate and publish a task; with `wait`, follow it to its terminal status."""
    if problem := subjects.id_problem(runner_id):
        return _fail(problem, 2)
    data = payload.encode()
    try:
        task = decode_task(data)
    except BadInput as err:
        return _fail(f"{err.error_type}: {err.message}", 2)
    nc = await client.connect(nats_url, name="exojet-cli")
    try:
        js = nc.jetstream()
        await stream_setup.ensure_streams(js)
        ack = await client.publish(js, subjects.task_subject(runner_id), data, msg_id=task.task_id)
        task_id = task.task_id or str(ack.seq)
        print(f"task {task_id} seq {ack.seq}" + (" (duplicate)" if ack.duplicate else ""))
        if not wait:
            return 0
        stream_id = (task.stream_id if isinstance(task, ChatCompletion) else None) or task_id
        return await wait_task(nc, runner_id, task_id, ack.seq, stream_id, isinstance(task, ChatCompletion), timeout)
    finally:
        await nc.close()


async def wait_task(
    nc: NATS,
    runner_id: str,
    task_id: str,
    after_seq: int,
    stream_id: str,
    chat: bool,
    timeout: float,
    verbose: bool = True,
) -> int:
    """Follow a published task to its terminal status (printing a chat's chunks); exit code."""
    done: asyncio.Future[TaskStatusUpdated] = asyncio.get_running_loop().create_future()

    def on_event(env: Envelope) -> None:
        message = message_of(env)
        if isinstance(message, TaskStatusUpdated) and message.task_id == task_id:
            failed = message.task_status not in (TaskStatus.RUNNING, TaskStatus.COMPLETE)
            if verbose or failed:
                print(
                    f"  {message.task_status}"
                    + (f" ({message.error_type}: {message.error_message})" if message.error_type else ""),
                    file=sys.stderr,
                )
            if message.task_status in TERMINAL_TASK_STATUSES and not done.done():
                done.set_result(message)

    subs: list[Follower | Subscription] = [
        await client.follow(nc, on_event, start_seq=after_seq + 1, subject=subjects.runner_events_subject(runner_id))
    ]
    if chat:
        subs += await read_chunks(nc, subjects.chunks_subject(runner_id, stream_id), _print_text)
    try:
        final = await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return _fail(f"task {task_id} reached no terminal status within {timeout} s")
    finally:
        for sub in subs:
            await sub.unsubscribe()
    if chat:
        print()
    return 0 if final.task_status == TaskStatus.COMPLETE else 1


def _print_text(text: str) -> None:
    print(text, end="", flush=True)


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """What `exojet state` asks about: one runner, task or instance, else the whole cluster."""

    runner_id: str | None = None
    task_id: str | None = None
    instance_id: str | None = None

    @property
    def endpoint(self) -> str:
        return "runner" if self.runner_id else "task" if self.task_id else "instance" if self.instance_id else "state"


async def show_state(nats_url: str, scope: Scope, as_json: bool, min_seq: int, paging: Paging) -> int:
    """Print the supervisor's projection (or one runner, task or instance of it), a page at a time."""
    nc = await client.connect(nats_url, name="exojet-cli")
    endpoint = scope.endpoint
    try:
        try:
            reply = await query(
                nc,
                endpoint,
                **msgspec.structs.asdict(scope),
                min_seq=min_seq or None,
                offset=paging.offset,
                limit=paging.limit,
            )
        except QueryFailed as err:
            return _fail(f"{err.code}: {err.message}")
    finally:
        await nc.close()
    if as_json:
        print(msgspec.json.encode(reply).decode())
    else:
        renders = {"runner": render_runner, "task": render_task, "instance": render_instance, "state": render_state}
        print(renders[endpoint](reply))
    return 0


_json = msgspec.json.Encoder()


async def replay_log(
    nats_url: str,
    runner_id: str | None,
    task_id: str | None,
    from_seq: int,
    to_seq: int | None,
    as_json: bool,
    show: bool,
    run_check: bool,
    archive: Path | None = None,
    html: Path | None = None,
    html_max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Print the log's timeline (filtered), and optionally the state as of `to_seq` and its check.

    The log is `EXO_LOG`, or an archive that `exojet log export` wrote, read alike."""
    if html is not None:
        return await _write_html(nats_url, archive, to_seq, html, html_max_bytes)
    state = ClusterState()
    # --state and --check answer a question of their own; the timeline would bury it.
    timeline = not (show or run_check)

    # The fold always starts at the log's first message so every line is judged
    # against the real state before it; only printing honours --from.
    def on_env(env: Envelope) -> None:
        nonlocal state
        message = message_of(env)
        if timeline and env.seq >= from_seq and _selected(env, message, runner_id, task_id):
            if as_json:
                print(_json.encode(envelope_json(env)).decode())
            else:
                print(timeline_line(env, *describe(state, env, message)))
        state = apply(state, env)

    if problem := await read_log(nats_url, archive, on_env, to_seq):
        return _fail(problem)
    if show:
        print(render_state(msgspec.to_builtins(state_reply(state))) if not as_json else _json.encode(state).decode())
    if run_check:
        return _print_check(state)
    return 0


async def _write_html(nats_url: str, archive: Path | None, to_seq: int | None, path: Path, max_bytes: int) -> int:
    report = HtmlReport(max_bytes)
    if problem := await read_log(nats_url, archive, report.on_env, to_seq):
        return _fail(problem)
    if not report.marks:
        return _fail("the log is empty: nothing to draw")
    embedded = report.write(path, f"exojet log, seq {report.marks[0].seq}-{report.marks[-1].seq}")
    print(f"wrote {path}: {len(report.marks)} messages, the cluster state embedded for the newest {embedded}")
    return 0


async def read_log(
    nats_url: str, archive: Path | None, on_env: Callable[[Envelope], None], to_seq: int | None = None
) -> str | None:
    """Feed `EXO_LOG` (or an archive `exojet log export` wrote) to `on_env`; what went wrong, if anything."""
    if archive is not None:
        try:
            replay_archive(archive, on_env, end_seq=to_seq)
        except ArchiveError as err:
            return str(err)
        return None
    nc = await client.connect(nats_url, name="exojet-replay")
    try:
        await client.replay(nc, on_env, end_seq=to_seq)
    finally:
        await nc.close()
    return None


async def explain_id(nats_url: str, target_id: str, archive: Path | None, as_json: bool) -> int:
    """Print the chain of messages that led `target_id` to its status, then its cause in one line."""
    explainer = Explainer(target_id)
    if problem := await read_log(nats_url, archive, explainer.feed):
        return _fail(problem)
    try:
        found = explainer.result()
    except UnknownId as err:
        return _fail(str(err))
    if as_json:
        print(_json.encode(found).decode())
        return 0
    print(f"{found.target} {target_id}: {found.status}")
    for step in found.steps:
        env = Envelope(seq=step.seq, subject=step.subject, data=b"", time=step.time)
        print(timeline_line(env, step.kind, step.words))
    print(f"cause: {found.cause}")
    return 0


def _print_check(state: ClusterState) -> int:
    report = check(state)
    if state.horizon:
        print(
            f"the log read starts at seq {state.horizon} (what came before was archived or removed by "
            "EXO_LOG's limits): statuses of tasks and runners met there are taken as they come"
        )
    for a in report.anomalies:
        print(f"anomaly at seq {a.seq}: {a.kind}: {a.detail}")
    if state.anomaly_count > len(report.anomalies):
        print(f"({state.anomaly_count} anomalies in all; the newest {len(report.anomalies)} listed)")
    for t in report.unfinished_tasks:
        print(f"unfinished task {t.task_id} ({t.task_type} on {t.runner_id}): {t.status} since seq {t.updated_seq}")
    for r in report.stuck_runners:
        print(f"stuck runner {r.runner_id}: {r.status} since seq {r.updated_seq}")
    print("check: ok" if report.ok else "check: problems found")
    return 0 if report.ok else 1


async def export_log(nats_url: str, from_seq: int, to_seq: int | None, path: Path) -> int:
    """Write `EXO_LOG` from `from_seq` to `to_seq` to `path` (gzip JSON lines, see bus/ops/archive.py)."""
    nc = await client.connect(nats_url, name="exojet-export")
    writer = ArchiveWriter(path)
    try:
        info = await nc.jetstream().stream_info(streams.LOG_STREAM)
        await client.replay(nc, writer.write, start_seq=from_seq, end_seq=to_seq)
    finally:
        writer.close()
        await nc.close()
    if writer.count == 0:
        return _fail(f"nothing to export: the log holds seq {info.state.first_seq}-{info.state.last_seq}")
    if writer.first_seq > from_seq:
        print(f"note: the log starts at seq {info.state.first_seq}; earlier messages were removed", file=sys.stderr)
    print(f"exported {writer.count} messages, seq {writer.first_seq}-{writer.last_seq}, to {path}")
    return 0


def _selected(env: Envelope, message: object, runner_id: str | None, task_id: str | None) -> bool:
    if runner_id and subjects.runner_of(env.subject) != runner_id:
        return False
    return not task_id or task_id_of(env, message) == task_id
