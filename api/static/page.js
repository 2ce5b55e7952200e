// The live page: the server rendered the first view; this keeps it live from the server-sent
// events that the API feeds from the log (one update per message, never the whole state).
"use strict";

const initial = JSON.parse(document.getElementById("initial").textContent);
const $ = (sel) => document.querySelector(sel);

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function upsert(tbody, id, cells, first) {
  let row = document.getElementById(id);
  const fresh = document.createElement("tr");
  fresh.id = id;
  fresh.append(...cells);
  if (row) row.replaceWith(fresh);
  else if (first) tbody.prepend(fresh);
  else tbody.append(fresh);
  tbody.closest("section").querySelector(".empty")?.remove();
  colourStatuses(fresh);
  return fresh;
}

function gib(bytes) {
  return bytes ? (bytes / 2 ** 30).toFixed(1) + " GiB" : "";
}

function runnerRow(r) {
  const since = cell("", "since");
  since.dataset.runner = r.runner_id;
  upsert($("#runners tbody"), "runner-" + r.runner_id, [
    cell(r.runner_id),
    cell(r.status, "status"),
    cell(r.model_id),
    // Chats in flight of the capacity, as projections/words.py chats_busy says it.
    cell(r.model_id ? `${r.status === "RunnerRunning" ? r.running_tasks.length : 0}/${r.chat_capacity}` : "", "chats"),
    // What it can do with its model, as projections/words.py can_words says it.
    cell((r.capabilities || []).join(", "), "can"),
    cell(r.memory_total ? `${gib(r.memory_free)} free of ${gib(r.memory_total)}` : ""),
    since,
    cell(r.error_message),
  ]);
  tick();
  loadBar(r);
}

function instanceRow(i) {
  upsert($("#instances tbody"), "instance-" + i.instance_id, [
    cell(i.instance_id),
    cell(i.model_id),
    cell(i.status, "status"),
    cell((i.placements || []).map((p) => p.runner_id).join(", ")),
    cell(i.reason),
  ], true);
  refreshModels();
}

// What a Placing instance waits for (the supervisors' planner rule, as the page's fold sees it).
function waitingReason(instanceId, why) {
  const row = document.getElementById("instance-" + instanceId);
  if (row && row.cells.length) row.cells[row.cells.length - 1].textContent = why;
}

function taskRow(t, time) {
  const tbody = $("#tasks tbody");
  upsert(tbody, "task-" + t.task_id, [
    cell(t.task_id),
    cell(t.task_type),
    cell(t.runner_id),
    cell(t.status, "status"),
    cell(t.error_type ? `${t.error_type}: ${t.error_message}` : ""),
    // Where a chat's time went (queue, prefill, decode), as projections/chat_time.py says it.
    cell(time),
  ], true);
  while (tbody.rows.length > 20) tbody.deleteRow(-1);
}

function bar(id, label, value, max) {
  let div = document.getElementById(id);
  if (!div) {
    div = document.createElement("div");
    div.id = id;
    div.innerHTML = "<progress></progress> <span></span>";
    $("#bars").append(div);
  }
  const progress = div.querySelector("progress");
  if (max) {
    progress.max = max;
    progress.value = value;
  } else {
    progress.removeAttribute("value");
  }
  div.querySelector("span").textContent = label;
}

function downloadBar(d) {
  const pct = d.total_bytes ? Math.round((100 * d.downloaded_bytes) / d.total_bytes) : 0;
  const mb = (n) => (n / 2 ** 20).toFixed(1);
  bar(`download-${d.runner_id}-${d.model_id}`, `${d.runner_id} download ${d.model_id}: ${mb(d.downloaded_bytes)} of ${mb(d.total_bytes)} MB (${pct}%), ${d.completed_files}/${d.total_files} files`, d.downloaded_bytes, d.total_bytes);
}

function loadBar(r) {
  const id = "load-" + r.runner_id;
  // A bar already showing layers keeps them: every event of the runner passes here.
  if (r.status === "RunnerLoading") {
    if (!document.getElementById(id)?.querySelector("progress[value]")) bar(id, `${r.runner_id} loading`, 0, 0);
  } else if (document.getElementById(id)) {
    const div = document.getElementById(id);
    const progress = div.querySelector("progress");
    const layers = progress.hasAttribute("value") ? div.querySelector("span").textContent.split(" (")[0] : `${r.runner_id} load`;
    bar(id, `${layers} (ended: ${r.status})`, 1, 1);
  }
}

function loadProgress(d) {
  bar(`load-${d.runner_id}`, `${d.runner_id} load ${d.model_id}: layer ${d.layers_loaded} of ${d.layers_total}`, d.layers_loaded, d.layers_total);
}

const SVG = "http://www.w3.org/2000/svg";

// A runner's tokens a second, one point a bucket, oldest left: drawn here, no library.
function chart(rates, bucketS) {
  const w = 300, h = 40;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.classList.add("rate-chart");
  svg.dataset.peak = Math.max(0, ...rates);
  const top = Math.max(1, ...rates);
  const step = rates.length > 1 ? w / (rates.length - 1) : w;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", rates.map((r, i) => `${(i * step).toFixed(1)},${(h - 2 - (r / top) * (h - 4)).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  const title = document.createElementNS(SVG, "title");
  title.textContent = `peak ${top.toFixed(1)} tokens/s, ${bucketS} s a point`;
  svg.append(title, line);
  return svg;
}

function loadView(load, bucketS) {
  const tbody = $("#load tbody");
  for (const r of load) {
    const plot = document.createElement("td");
    plot.append(chart(r.rates, bucketS));
    upsert(tbody, "load-row-" + r.runner_id, [
      cell(r.runner_id),
      cell(r.chats),
      cell(r.queued),
      cell(r.recent.toFixed(1)),
      plot,
    ]);
  }
}

const heartbeats = new Map(Object.entries(initial.heartbeats || {}));

function tick() {
  const now = Date.now() / 1000;
  for (const td of document.querySelectorAll("td.since")) {
    const at = heartbeats.get(td.dataset.runner);
    td.textContent = at ? `${Math.max(0, now - at).toFixed(0)} s ago` : "no heartbeat seen";
  }
}

function refreshModels() {
  const select = $("#chat-model");
  const ready = [...document.querySelectorAll("#instances tbody tr")]
    .filter((tr) => tr.cells[2].textContent === "Ready")
    .map((tr) => tr.cells[1].textContent);
  const have = [...select.options].map((o) => o.value);
  for (const m of new Set(ready)) if (!have.includes(m)) select.add(new Option(m, m));
}

const timeline = new ExojetTimeline($("#timeline"), $("#event-detail"), async (seq) => {
  const reply = await fetch(`/timeline/${seq}`);
  return reply.json();
});
for (const mark of initial.marks) timeline.add(mark);

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => {
    $("#conn").textContent = "live";
    $("#conn").className = "live";
  };
  source.onerror = () => {
    $("#conn").textContent = "reconnecting…";
    $("#conn").className = "down";
  };
  source.onmessage = (e) => {
    const u = JSON.parse(e.data);
    if (u.heartbeat) heartbeats.set(u.heartbeat.runner_id, u.heartbeat.at);
    if (u.mark) {
      timeline.add(u.mark);
      $("#seq").textContent = u.mark.seq;
    }
    if (u.runner) runnerRow(u.runner);
    if (u.task) taskRow(u.task, u.task_time);
    if (u.load) loadView(u.load, u.bucket_s);
    for (const i of u.instances || []) instanceRow(i);
    for (const [id, why] of Object.entries(u.waiting || {})) waitingReason(id, why);
    for (const d of u.downloads || []) downloadBar(d);
    for (const d of u.loads || []) loadProgress(d);
  };
}

async function chat(event) {
  event.preventDefault();
  const out = $("#chat-output");
  const input = $("#chat-input");
  const body = {
    model: $("#chat-model").value,
    messages: [{ role: "user", content: input.value }],
    max_tokens: 64,
    stream: true,
  };
  out.textContent = "";
  out.dataset.state = "streaming";
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!reply.ok) {
      out.textContent = `error ${reply.status}: ${(await reply.json()).error?.message}`;
      out.dataset.state = "error";
      return;
    }
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const ev of events) {
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) out.textContent += `\n[error: ${obj.error.message}]`;
        else out.textContent += obj.choices?.[0]?.delta?.content || "";
      }
    }
    out.dataset.state = "done";
  } catch (err) {
    out.textContent += `\n[error: ${err}]`;
    out.dataset.state = "error";
  }
}

colourStatuses(document);
refreshModels();
loadView(initial.load, initial.bucket_s);
$("#chat-form").addEventListener("submit", chat);
tick();
setInterval(tick, 1000);
connect();
