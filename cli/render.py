"""Readable tables of the projection, for `exojet state` and `exojet replay --state`."""

from __future__ import annotations

from typing import Any

from exojet.bus.events import Placement
from exojet.bus.lifecycle import LOADING
from exojet.bus.replies import (
    AnyReply,
    Connections,
    ConnectionSummary,
    InstanceReply,
    Page,
    RunnerConnection,
    RunnerReply,
    StateReply,
    TaskReply,
)
from exojet.bus.results import LoadResult, result_as
from exojet.bus.statuses import TaskStatus
from exojet.bus.views import InstanceView, RunnerView, TaskView
from exojet.projections.placing import shown_reason
from exojet.projections.words import can_words, chats_busy, instance_can_words, load_words


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A left-aligned text table."""
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _short(status: str) -> str:
    return status.removeprefix("Runner")


def render_runner_rows(runners: dict[str, RunnerView], engines: dict[str, str] | None = None) -> str:
    """The runners as a table; `engines`: the engine each serves its model on, and why (`serving_engines`)."""
    rows = [
        [
            r.runner_id,
            _short(r.status) + (f" ({r.error_message})" if r.error_message else ""),
            r.incarnation,
            r.model_id,
            (engines or {}).get(r.runner_id),
            chats_busy(r) or None,
            can_words(r) or None,
            ", ".join(r.running_tasks) or None,
            r.last_event_seq,
        ]
        for r in sorted(runners.values(), key=lambda r: r.runner_id)
    ]
    return table(["RUNNER", "STATUS", "INC", "MODEL", "ENGINE", "CHATS", "CAN DO", "TASKS", "LAST SEQ"], rows)


def serving_engines(tasks: list[TaskView]) -> dict[str, str]:
    """Each runner's engine as its newest completed LoadModel states it, with the reason
    when it is not the first choice (another engine crashed on the model)."""
    engines: dict[str, str] = {}
    for t in sorted(tasks, key=lambda t: t.created_seq):
        if t.task_type != "LoadModel" or t.status != TaskStatus.COMPLETE:
            continue
        result = result_as(LoadResult, t.result)
        if result is not None and result.engine:
            reason = result.engine_reason
            engines[t.runner_id] = result.engine + (f" ({reason})" if reason else "")
    return engines


def render_task_rows(tasks: list[TaskView]) -> str:
    rows = []
    for t in tasks:
        error = f"{t.error_type}: {t.error_message}" if t.error_type else None
        rows.append([t.task_id, t.task_type, t.runner_id, t.status, t.created_seq, t.updated_seq, error])
    return table(["TASK", "TYPE", "RUNNER", "STATUS", "SEQ", "UPDATED", "ERROR"], rows)


def render_instance_rows(
    instances: dict[str, InstanceView], waiting: dict[str, str], runners: dict[str, RunnerView] | None = None
) -> str:
    """Instances: status (with the reason of a failure, or what a Placing one waits for), attempt,
    runners and their layers, and (given the runners) what a Ready one can do."""
    rows = []
    for i in sorted(instances.values(), key=lambda i: i.created_seq):
        status = i.status + (" (gave up)" if i.gave_up else "")
        placed = ", ".join(_placement(p) for p in i.placements) or None
        rows.append(
            [
                i.instance_id,
                i.model_id,
                status,
                i.attempt,
                placed,
                i.chats_in_flight,
                (instance_can_words(i, runners) or None) if runners is not None and i.status == "Ready" else None,
                shown_reason(i.reason, waiting.get(i.instance_id)),
            ]
        )
    return table(["INSTANCE", "MODEL", "STATUS", "ATTEMPT", "RUNNERS", "CHATS", "CAN DO", "REASON"], rows)


def _placement(p: Placement) -> str:
    if p.shard.start_layer is None:
        return p.runner_id
    return f"{p.runner_id}[{p.shard.start_layer}:{p.shard.end_layer}]"


def render_reply(reply: AnyReply) -> str:
    """A supervisor's reply to `exojet state` (or `--runner`, `--task`, `--instance`) as text."""
    if isinstance(reply, RunnerReply):
        return render_runner(reply)
    if isinstance(reply, TaskReply):
        return render_task(reply)
    if isinstance(reply, InstanceReply):
        return render_instance(reply)
    return render_state(reply)


def render_state(reply: StateReply) -> str:
    """The `exo.supervisor.state` reply (or a local fold's) as text."""
    parts = [
        f"seq {reply.seq}",
        "",
        f"runners{_page_note(reply.runners_page, len(reply.runners))}",
        render_runner_rows(reply.runners, serving_engines(list(reply.tasks.values()))),
    ]
    if reply.drained:
        parts += ["", f"drained for maintenance (nothing is placed on them): {', '.join(reply.drained)}"]
    if reply.connections and (outages := _outage_rows(reply.connections)):
        parts += ["", "connections to NATS that were lost (and are back)", table(["PART", "OUTAGES", "LAST"], outages)]
    if reply.instances:
        parts += [
            "",
            f"instances{_page_note(reply.instances_page, len(reply.instances))}",
            render_instance_rows(reply.instances, reply.waiting, reply.runners),
        ]
    if reply.pending_chat_count:
        parts += ["", f"{reply.pending_chat_count} chats waiting for a Ready instance"]
    tasks = sorted(reply.tasks.values(), key=lambda t: t.created_seq)
    if tasks:
        parts += ["", f"tasks{_page_note(reply.tasks_page, len(reply.tasks))}", render_task_rows(tasks)]
    if reply.pruned:
        parts += [
            "",
            f"{reply.pruned} finished tasks, chats and instances pruned up to seq {reply.pruned_seq} "
            "(they stay in the log: `exojet replay --task ID`)",
        ]
    downloads = [d for d in reply.downloads.values() if d.downloaded_bytes < d.total_bytes]
    if downloads:
        parts += [
            "",
            "downloads in progress",
            table(
                ["RUNNER", "MODEL", "BYTES", "FILES"],
                [
                    [
                        d.runner_id,
                        d.model_id,
                        f"{d.downloaded_bytes}/{d.total_bytes}",
                        f"{d.completed_files}/{d.total_files}",
                    ]
                    for d in downloads
                ],
            ),
        ]
    # A runner still Loading with its newest report; a supervisor older than `loads` sends none.
    loading = {r.runner_id for r in reply.runners.values() if r.status == LOADING}
    loads = [d for d in reply.loads.values() if d.runner_id in loading]
    if loads:
        parts += [
            "",
            "loads in progress",
            table(
                ["RUNNER", "MODEL", "LAYERS"],
                [[d.runner_id, d.model_id, load_words(d.layers_loaded, d.layers_total)] for d in loads],
            ),
        ]
    if reply.anomaly_count:
        parts += ["", f"{reply.anomaly_count} anomalies (newest last):"]
        parts += [f"  seq {a.seq}: {a.kind}: {a.detail}" for a in reply.anomalies]
    return "\n".join(parts)


def _outage_rows(connections: Connections) -> list[list[Any]]:
    """A row per supervisor or runner whose connection to NATS was lost at least once."""
    parts: list[tuple[str, ConnectionSummary | RunnerConnection]] = [
        *((f"runner {name}", conn) for name, conn in sorted(connections.runners.items())),
        *((f"supervisor {name}", conn) for name, conn in sorted(connections.supervisors.items())),
    ]
    return [[part, conn.outages, f"{conn.last_outage_s or 0:.1f} s"] for part, conn in parts if conn.outages]


def _page_note(page: Page, listed: int) -> str:
    """` (41-60 of 300, --offset 60 for more)` when a section's page is not all of it."""
    if page.total <= listed and page.offset == 0:
        return ""
    more = f", --offset {page.next_offset} for more" if page.next_offset is not None else ""
    return f" ({page.offset + 1}-{page.offset + listed} of {page.total}{more})"


def render_runner(reply: RunnerReply) -> str:
    runner = reply.runner
    return "\n".join(
        [
            f"seq {reply.seq}",
            "",
            render_runner_rows({runner.runner_id: runner}, serving_engines(reply.tasks)),
            "",
            render_task_rows(reply.tasks),
        ]
    )


def render_instance(reply: InstanceReply) -> str:
    inst = reply.instance
    return "\n".join(
        [
            f"seq {reply.seq}",
            "",
            render_instance_rows({inst.instance_id: inst}, {inst.instance_id: reply.waiting} if reply.waiting else {}),
        ]
    )


def render_task(reply: TaskReply) -> str:
    task = reply.task
    lines = [f"seq {reply.seq}", "", render_task_rows([task])]
    if task.result:
        lines += ["", "result: " + ", ".join(f"{k}={v!r}" for k, v in task.result.items())]
    return "\n".join(lines)
