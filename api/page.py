"""The live page at `/` and what feeds it: `/events` (server-sent events from the log),
`/timeline/{seq}` (a message and the cluster state the page's fold had after it: checkpoints
and a bounded replay, `api/timeline_index.py`), `/metrics`,
`/static/*` (plain committed JS and CSS: no CDN, no build step).

The first view is rendered here, statuses as page text, so it reads without scripts; the
script then keeps it live from `/events`. `report_html` writes the same timeline as one
self-contained file for `exojet replay --html`.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from exojet.api.live import LiveCluster
from exojet.api.timeline_index import NotIndexedYet, NotKept, TimelineBusy
from exojet.bus.nats import client
from exojet.bus.views import RunnerView
from exojet.projections.placing import shown_reason
from exojet.projections.timeline import Mark
from exojet.projections.words import can_words, chats_busy, load_words

STATIC = Path(__file__).parent / "static"
RECENT_TASKS = 20
# A comment line this often keeps proxies and the browser from timing an idle stream out.
KEEPALIVE_S = 15.0
# How long a scrape waits for the fold to reach the log's last message.
SCRAPE_CATCH_UP_S = 1.0

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element."""
    return msgspec.json.encode(value).decode().replace("</", "<\\/")


def _rows(rows: Iterable[list[object]], status_col: int, row_ids: Iterable[str]) -> str:
    out = []
    for row_id, row in zip(row_ids, rows, strict=True):
        cells = "".join(
            f'<td class="status">{_e(v)}</td>' if i == status_col else f"<td>{_e(v)}</td>" for i, v in enumerate(row)
        )
        out.append(f'<tr id="{_e(row_id)}">{cells}</tr>')
    return "".join(out)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else ""


def _runner_row(r: dict[str, Any]) -> str:
    rid = _e(r["runner_id"])
    memory = f"{_gib(r['memory_free'])} free of {_gib(r['memory_total'])}" if r["memory_total"] else ""
    view = msgspec.convert(r, RunnerView)
    return (
        f'<tr id="runner-{rid}"><td>{rid}</td><td class="status">{_e(r["status"])}</td><td>{_e(r["model_id"])}</td>'
        f'<td class="chats">{_e(chats_busy(view))}</td><td class="can">{_e(can_words(view))}</td><td>{_e(memory)}</td>'
        f'<td class="since" data-runner="{rid}">-</td><td>{_e(r["error_message"])}</td></tr>'
    )


def _load_bar(runner_id: str, loads: dict[str, dict[str, Any]]) -> str:
    """A Loading runner's bar: "layer k of n" from its newest LoadProgress, if it sent one yet."""
    mine = [d for d in loads.values() if d["runner_id"] == runner_id]
    newest = max(mine, key=lambda d: d["updated_seq"], default=None)
    if newest is None:
        progress, words = "<progress></progress>", "loading"
    else:
        progress = f'<progress max="{newest["layers_total"]}" value="{newest["layers_loaded"]}"></progress>'
        words = f"load {_e(newest['model_id'])}: {load_words(newest['layers_loaded'], newest['layers_total'])}"
    return f'<div id="load-{_e(runner_id)}">{progress} <span>{_e(runner_id)} {words}</span></div>'


def _placed_on(i: dict[str, Any]) -> str:
    return ", ".join(p["runner_id"] for p in i["placements"])


def render_page(snap: dict[str, Any]) -> str:
    """The first view: runners, instances, progress, recent tasks, the chat box, the timeline."""
    runners = list(snap["runners"].values())
    runner_rows = "".join(_runner_row(r) for r in runners)
    instances = list(snap["instances"].values())
    instance_rows = _rows(
        (
            [
                i["instance_id"],
                i["model_id"],
                i["status"],
                ", ".join(p["runner_id"] for p in i["placements"]),
                shown_reason(i["reason"], snap["waiting"].get(i["instance_id"])),
            ]
            for i in instances
        ),
        2,
        (f"instance-{i['instance_id']}" for i in instances),
    )
    tasks = list(snap["tasks"].values())[:RECENT_TASKS]
    task_rows = _rows(
        (
            [
                t["task_id"],
                t["task_type"],
                t["runner_id"],
                t["status"],
                f"{t['error_type']}: {t['error_message']}" if t["error_type"] else "",
                snap["task_times"].get(t["task_id"], ""),
            ]
            for t in tasks
        ),
        3,
        (f"task-{t['task_id']}" for t in tasks),
    )
    bars = "".join(
        f'<div id="download-{_e(d["runner_id"])}-{_e(d["model_id"])}"><progress max="{d["total_bytes"] or 1}" '
        f'value="{d["downloaded_bytes"]}"></progress> <span>{_e(d["runner_id"])} download {_e(d["model_id"])}: '
        f"{d['downloaded_bytes'] / 2**20:.1f} of {d['total_bytes'] / 2**20:.1f} MB</span></div>"
        for d in snap["downloads"].values()
    ) + "".join(_load_bar(r["runner_id"], snap["loads"]) for r in runners if r["status"] == "RunnerLoading")
    empty = '<p class="empty">none yet</p>'
    initial = {
        "heartbeats": snap["heartbeats"],
        "marks": snap["marks"],
        "load": snap["load"],
        "bucket_s": snap["bucket_s"],
    }
    load_rows = "".join(
        f'<tr id="load-row-{_e(r["runner_id"])}"><td>{_e(r["runner_id"])}</td><td>{_e(r["chats"])}</td>'
        f"<td>{r['queued']}</td><td>{r['recent']}</td><td></td></tr>"
        for r in snap["load"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>exojet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/page.css"></head>
<body>
<header><h1>exojet</h1><span>log seq <span id="seq">{snap["seq"]}</span></span>
<span id="conn">static view (scripts off or not yet live)</span></header>
<section id="runners"><h2>Runners</h2>
<table><thead><tr><th>runner</th><th>status</th><th>model</th><th>chats</th><th>can do</th><th>memory</th>
<th>last heartbeat</th><th>error</th></tr>
</thead><tbody>{runner_rows}</tbody></table>{"" if runners else empty}</section>
<section id="instances"><h2>Instances</h2>
<table><thead><tr><th>instance</th><th>model</th><th>status</th><th>runners</th><th>reason</th></tr></thead>
<tbody>{instance_rows}</tbody></table>{"" if instances else empty}</section>
<section id="load"><h2>Load</h2><p>Chats busy of each runner's capacity, chats waiting in its queue, and
the tokens it generated a second over the last minutes.</p>
<table><thead><tr><th>runner</th><th>chats</th><th>queued</th><th>tokens/s</th><th>last 5 minutes</th></tr></thead>
<tbody>{load_rows}</tbody></table></section>
<section id="progress"><h2>Downloads and loads</h2><div id="bars" class="bars">{bars}</div></section>
<section id="tasks"><h2>Recent tasks</h2>
<table><thead><tr><th>task</th><th>type</th><th>runner</th><th>status</th><th>error</th><th>time</th></tr></thead>
<tbody>{task_rows}</tbody></table>{"" if tasks else empty}</section>
<section id="chat"><h2>Chat</h2>
<form id="chat-form"><select id="chat-model"></select> <input id="chat-input" placeholder="Ask the cluster" required>
<button type="submit">Send</button></form><pre id="chat-output"></pre></section>
<section><h2>Timeline</h2><p>One lane per runner and one for the supervisors; click a mark for the message and
the cluster state after it.</p><div id="timeline" class="timeline"></div><pre id="event-detail"></pre></section>
<script id="initial" type="application/json">{_script_json(initial)}</script>
<script src="/static/timeline.js"></script><script src="/static/page.js"></script>
</body></html>
"""


def report_html(title: str, marks: list[Mark], details: dict[int, Any]) -> str:
    """The timeline as one self-contained file: marks, and for each a message and maybe its state."""
    css = (STATIC / "page.css").read_text()
    js = (STATIC / "timeline.js").read_text()
    boot = """
const report = JSON.parse(document.getElementById("report").textContent);
const tl = new ExojetTimeline(document.getElementById("timeline"), document.getElementById("event-detail"),
  async (seq) => report.details[seq]);
for (const mark of report.marks) tl.add(mark);
"""
    rows = "".join(
        f"<tr><td>{m.seq}</td><td>{_e(m.lane)}</td><td>{_e(m.kind)}</td><td>{_e(m.words)}</td>"
        f'<td class="status">{_e(m.status)}</td></tr>'
        for m in marks
    )
    data = {"marks": marks, "details": details}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<link rel="icon" href="data:,"><style>{css}</style></head>
<body><header><h1>{_e(title)}</h1></header>
<section><h2>Timeline</h2><div id="timeline" class="timeline"></div><pre id="event-detail"></pre></section>
<section><h2>Every message</h2><table><thead><tr><th>seq</th><th>lane</th><th>type</th><th>in words</th>
<th>status</th></tr></thead><tbody>{rows}</tbody></table></section>
<script id="report" type="application/json">{_script_json(data)}</script>
<script>{js}{boot}colourStatuses(document);</script>
</body></html>
"""


class Page:
    """The routes over one `LiveCluster`."""

    def __init__(self, live: LiveCluster) -> None:
        self.live = live

    async def index(self, request: Request) -> Response:
        await self.live.ready()
        return HTMLResponse(render_page(self.live.snapshot()))

    async def events(self, request: Request) -> Response:
        await self.live.ready()
        queue = self.live.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keepalive\n\n"
            finally:
                self.live.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def timeline(self, request: Request) -> Response:
        await self.live.ready()
        seq = int(request.path_params["seq"])
        try:
            event, state = await self.live.state_at(seq)
        except NotKept as err:
            return Response(msgspec.json.encode({"event": None, "note": str(err)}), 404, media_type="application/json")
        except (TimelineBusy, NotIndexedYet) as err:
            # Both pass: the client asks again (the page's script shows the note meanwhile).
            status = 429 if isinstance(err, TimelineBusy) else 503
            note = msgspec.json.encode({"event": None, "note": str(err)})
            return Response(note, status, media_type="application/json", headers={"Retry-After": "1"})
        body = {"event": event, "state": state} if event else {"event": None, "note": f"no message at seq {seq}"}
        return Response(msgspec.json.encode(body), 200 if event else 404, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        await self.live.ready()
        assert self.live.nc is not None
        last = self.live.metrics.gauges.log_last_seq = await client.last_seq(self.live.nc.jetstream())
        # A scrape answers for the log as it was when it came (the lag gauge says if it could not).
        await self.live.caught_up(last, SCRAPE_CATCH_UP_S)
        return Response(generate_latest(self.live.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def page_routes(nats_url: str, lifespan: Lifespan) -> tuple[list[BaseRoute], Lifespan]:
    """The page's routes, and `lifespan` extended to close the live fold behind them."""
    live = LiveCluster(nats_url)
    page = Page(live)

    @asynccontextmanager
    async def closing(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(app):
            live.begin()
            try:
                yield
            finally:
                await live.close()

    return [
        Route("/", page.index, methods=["GET"]),
        Route("/events", page.events, methods=["GET"]),
        Route("/timeline/{seq:int}", page.timeline, methods=["GET"]),
        Route("/metrics", page.metrics, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ], closing
