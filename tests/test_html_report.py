"""`replay --html`'s report without a browser: marks from the fold, states embedded up to the cap."""

from __future__ import annotations

import json
import re
from pathlib import Path

from exojet.cli.html_report import HtmlReport
from tests.sample_logs import INST, ready_log


def _report(tmp_path: Path, max_bytes: int) -> tuple[HtmlReport, dict[str, object]]:
    report = HtmlReport(max_bytes)
    for env in ready_log().envs:
        report.on_env(env)
    path = tmp_path / "log.html"
    report.write(path, "t")
    embedded = re.search(r'<script id="report" type="application/json">(.*?)</script>', path.read_text(), re.S)
    assert embedded is not None
    return report, json.loads(embedded.group(1))


def test_marks_carry_lanes_words_and_statuses(tmp_path: Path) -> None:
    report, data = _report(tmp_path, 10**7)
    marks = {m.seq: m for m in report.marks}
    assert (marks[3].lane, marks[3].kind, marks[3].status) == ("supervisors", "PlaceInstance", "Placing")
    assert (marks[4].lane, marks[4].status) == ("supervisors", "Downloading")
    assert (marks[16].lane, marks[16].words, marks[16].status) == (
        "r1",
        "r1: RunnerWarmingUp -> RunnerReady",
        "RunnerReady",
    )
    details = data["details"]
    assert isinstance(details, dict) and len(details) == 16
    assert details["15"]["state"]["instances"][INST]["status"] == "Ready"
    assert details["14"]["state"]["instances"][INST]["status"] == "WarmingUp"


def test_states_past_the_cap_name_the_command_that_rebuilds_them(tmp_path: Path) -> None:
    full, _ = _report(tmp_path, 10**7)
    one_state = len(full.states[-1][1])
    report, data = _report(tmp_path, 3 * one_state)
    details = data["details"]
    assert isinstance(details, dict)
    embedded = [seq for seq, d in details.items() if "state" in d]
    assert 1 <= len(embedded) <= 3 and "16" in embedded  # the newest are kept
    assert details["1"]["note"] == "state not embedded (over the report's size cap): exojet replay --to 1 --state"
    assert details["1"]["event"]["message"]["type"] == "RunnerRegistered"
