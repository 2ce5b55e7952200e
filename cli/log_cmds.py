"""`exojet replay`, `exojet explain`, `exojet log export`: read the log (`EXO_LOG`, or an archive)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from exojet.bus import streams, subjects
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.ops.archive import ArchiveError, ArchiveWriter, replay_archive
from exojet.cli.html_report import DEFAULT_MAX_BYTES, HtmlReport
from exojet.cli.options import Subparsers, add_nats, fail
from exojet.cli.render import render_state
from exojet.cli.timeline import timeline_line
from exojet.projections.apply import apply
from exojet.projections.checks import check
from exojet.projections.explain import Explainer, UnknownId
from exojet.projections.queries import state_reply
from exojet.projections.state import ClusterState
from exojet.projections.words import describe, envelope_json, message_of, task_id_of
from exojet.supervisor.plan_preview import PlanPreview

_json = msgspec.json.Encoder()


def add_parsers(sub: Subparsers) -> None:
    """Register `replay`, `explain` and `log export`."""
    _add_replay(sub)
    p = sub.add_parser("explain", help="how a task, runner, instance or chat got its status, and why (from the log)")
    p.add_argument("id", help="a runner, task, instance or routed chat id")
    p.add_argument("--json", action="store_true", help="print JSON instead of words")
    _add_file(p)
    add_nats(p)
    p.set_defaults(func=lambda args: asyncio.run(explain_id(args.nats, args.id, args.file, args.json)))

    p = sub.add_parser("log", help="the log itself")
    log_sub = p.add_subparsers(dest="log_command", required=True)
    p = log_sub.add_parser("export", help="archive a range of EXO_LOG as gzip JSON lines (`replay --file` reads it)")
    _add_range(p)
    p.add_argument("file", type=Path, help="the archive to write (gzip-compressed JSON lines)")
    add_nats(p)
    p.set_defaults(func=lambda args: asyncio.run(export_log(args.nats, args.from_seq, args.to_seq, args.file)))


def _add_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="first log sequence (default %(default)s)")
    p.add_argument("--to", dest="to_seq", type=int, default=None, help="last log sequence (default: the newest)")


def _add_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, default=None, help="read an archive `exojet log export` wrote, not EXO_LOG")


def _add_replay(sub: Subparsers) -> None:
    p = sub.add_parser("replay", help="the log's timeline, rebuilt locally (no supervisor needed)")
    p.add_argument("--runner", default=None, help="only the messages about this runner")
    p.add_argument("--task", default=None, help="only the messages about this task")
    _add_range(p)
    p.add_argument("--json", action="store_true", help="one JSON object a line: seq, subject, time, message")
    p.add_argument("--state", action="store_true", help="print the projection as of --to (instead of the timeline)")
    p.add_argument(
        "--check",
        action="store_true",
        help="list anomalies, unfinished tasks and stuck runners (instead of the timeline); exit 1 if any",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="replay the log through this version's planner and print, in words, every decision that differs "
        "from what the log shows was decided (instead of the timeline): an upgrade's preview",
    )
    _add_file(p)
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        help="write the timeline as one self-contained HTML file (instead of printing it)",
    )
    p.add_argument(
        "--html-max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="embed the cluster state of the newest marks up to this many bytes "
        f"(default {DEFAULT_MAX_BYTES >> 20} MiB)",
    )
    add_nats(p)
    p.set_defaults(func=lambda args: asyncio.run(replay_log(args.nats, Replay.of(args))))


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """What `exojet replay` reads and prints: which messages, and as what."""

    runner_id: str | None = None
    task_id: str | None = None
    from_seq: int = 1
    to_seq: int | None = None
    as_json: bool = False
    show_state: bool = False
    run_check: bool = False
    preview_plan: bool = False
    archive: Path | None = None
    html: Path | None = None
    html_max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def of(cls, args: argparse.Namespace) -> Replay:
        return cls(
            runner_id=args.runner,
            task_id=args.task,
            from_seq=args.from_seq,
            to_seq=args.to_seq,
            as_json=args.json,
            show_state=args.state,
            run_check=args.check,
            preview_plan=args.plan,
            archive=args.file,
            html=args.html,
            html_max_bytes=args.html_max_bytes,
        )


async def replay_log(nats_url: str, replay: Replay) -> int:
    """Print the log's timeline (filtered), and optionally the state as of `to_seq` and its check.

    The log is `EXO_LOG`, or an archive that `exojet log export` wrote, read alike."""
    if replay.html is not None:
        return await _write_html(nats_url, replay.archive, replay.to_seq, replay.html, replay.html_max_bytes)
    if replay.preview_plan:
        return await _preview_plan(nats_url, replay.archive, replay.to_seq)
    state = ClusterState()
    # --state and --check answer a question of their own; the timeline would bury it.
    timeline = not (replay.show_state or replay.run_check)

    # The fold always starts at the log's first message so every line is judged
    # against the real state before it; only printing honours --from.
    def on_env(env: Envelope) -> None:
        nonlocal state
        message = message_of(env)
        if timeline and env.seq >= replay.from_seq and _selected(env, message, replay.runner_id, replay.task_id):
            if replay.as_json:
                print(_json.encode(envelope_json(env)).decode())
            else:
                print(timeline_line(env, *describe(state, env, message)))
        state = apply(state, env)

    if problem := await read_log(nats_url, replay.archive, on_env, replay.to_seq):
        return fail(problem)
    if replay.show_state:
        print(_json.encode(state).decode() if replay.as_json else render_state(state_reply(state)))
    if replay.run_check:
        return _print_check(state)
    return 0


async def _preview_plan(nats_url: str, archive: Path | None, to_seq: int | None) -> int:
    preview = PlanPreview()
    if problem := await read_log(nats_url, archive, preview.feed, to_seq):
        return fail(problem)
    differences = preview.differences()
    for d in differences:
        print(f"seq {d.seq}: {d.words}")
    print(f"{len(differences)} decisions differ from the log's ({preview.state.seq} messages replayed)")
    return 0


async def _write_html(nats_url: str, archive: Path | None, to_seq: int | None, path: Path, max_bytes: int) -> int:
    report = HtmlReport(max_bytes)
    if problem := await read_log(nats_url, archive, report.on_env, to_seq):
        return fail(problem)
    if not report.marks:
        return fail("the log is empty: nothing to draw")
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
        return fail(problem)
    try:
        found = explainer.result()
    except UnknownId as err:
        return fail(str(err))
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
        return fail(f"nothing to export: the log holds seq {info.state.first_seq}-{info.state.last_seq}")
    if writer.first_seq > from_seq:
        print(f"note: the log starts at seq {info.state.first_seq}; earlier messages were removed", file=sys.stderr)
    print(f"exported {writer.count} messages, seq {writer.first_seq}-{writer.last_seq}, to {path}")
    return 0


def _selected(env: Envelope, message: object, runner_id: str | None, task_id: str | None) -> bool:
    if runner_id and subjects.runner_of(env.subject) != runner_id:
        return False
    return not task_id or task_id_of(env, message) == task_id
