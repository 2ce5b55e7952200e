// The log as a picture: one lane per runner and one for the supervisors, a mark per message
// coloured by the status it left, a click shows the message and the cluster state at its seq.
// The states come from the Python fold (fetched from the API, or embedded by `replay --html`).
"use strict";

function statusClass(status) {
  const s = String(status || "");
  if (/Fail|Lost|Invalid|Refused|TimedOut|Cancel|Shutdown/.test(s)) return "st-bad";
  if (/Ready|Complete|Loaded|Idle|Connected/.test(s)) return "st-good";
  if (/Running|Loading|Download|Warming|Connecting|Placing|Pending|Routed|ShuttingDown/.test(s)) return "st-busy";
  return "st-other";
}

function colourStatuses(root) {
  for (const el of root.querySelectorAll(".status")) {
    el.classList.remove("st-bad", "st-good", "st-busy", "st-other");
    el.classList.add(statusClass(el.textContent));
  }
}

class ExojetTimeline {
  constructor(container, detail, load) {
    this.container = container;
    this.detail = detail;
    this.load = load; // seq -> Promise of {event, state}
    this.lanes = new Map();
    this.step = 14;
    this.firstSeq = null;
    this.axis = document.createElement("div");
    this.axis.className = "tl-axis";
    this.container.appendChild(this.axis);
  }

  lane(name) {
    let row = this.lanes.get(name);
    if (row) return row;
    row = document.createElement("div");
    row.className = "tl-lane";
    row.dataset.lane = name;
    const label = document.createElement("span");
    label.className = "tl-label";
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "tl-track";
    row.append(label, track);
    // The supervisors' lane stays first, runners after it by name.
    const after = [...this.lanes.keys()].filter((k) => k !== "supervisors" && k > name).sort()[0];
    if (name === "supervisors") this.axis.after(row);
    else if (after) this.lanes.get(after).before(row);
    else this.container.appendChild(row);
    this.lanes.set(name, row);
    return row;
  }

  add(mark) {
    if (this.firstSeq === null) this.firstSeq = mark.seq;
    const track = this.lane(mark.lane).querySelector(".tl-track");
    const dot = document.createElement("button");
    dot.type = "button";
    dot.className = "tl-mark " + statusClass(mark.status);
    dot.dataset.seq = mark.seq;
    dot.style.left = (mark.seq - this.firstSeq) * this.step + "px";
    dot.title = `seq ${mark.seq} ${mark.kind}: ${mark.words} [${mark.status}]`;
    dot.addEventListener("click", () => this.open(mark));
    track.appendChild(dot);
    const width = (mark.seq - this.firstSeq + 2) * this.step + "px";
    for (const row of this.lanes.values()) row.querySelector(".tl-track").style.width = width;
    this.axis.textContent = `seq ${this.firstSeq} … ${mark.seq}`;
  }

  async open(mark) {
    this.container.querySelector(".tl-mark.selected")?.classList.remove("selected");
    this.container.querySelector(`.tl-mark[data-seq="${mark.seq}"]`)?.classList.add("selected");
    this.detail.textContent = `seq ${mark.seq}: loading…`;
    const found = await this.load(mark.seq);
    const lines = [`seq ${mark.seq}  ${mark.kind}  ${mark.words}`, "", "message:", JSON.stringify(found.event, null, 2)];
    if (found.state) {
      lines.push("", `cluster state after seq ${mark.seq} (the Python fold):`);
      for (const r of Object.values(found.state.runners || {})) {
        lines.push(`  runner ${r.runner_id}: ${r.status}${r.error_message ? " (" + r.error_message + ")" : ""}`);
      }
      for (const i of Object.values(found.state.instances || {})) {
        lines.push(`  instance ${i.instance_id}: ${i.status} ${i.model_id}${i.reason ? " (" + i.reason + ")" : ""}`);
      }
      lines.push("", JSON.stringify(found.state, null, 2));
    } else {
      lines.push("", found.note || "state not available");
    }
    this.detail.textContent = lines.join("\n");
    this.detail.dataset.seq = mark.seq;
  }
}
