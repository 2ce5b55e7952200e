"""Progress bars from the log's events: bars on a terminal, plain lines only without one."""

from __future__ import annotations

import io

from exojet.bus.codec import encode
from exojet.bus.envelope import Envelope
from exojet.bus.events import DownloadProgress, LoadProgress, RunnerStatusUpdated
from exojet.bus.statuses import RunnerLoaded, RunnerLoading
from exojet.cli.progress import ProgressBars

MB = 1024 * 1024


def _events() -> list[Envelope]:
    subject = "exo.events.runner.r1"
    messages = [
        DownloadProgress(
            event_id="d",
            runner_id="r1",
            model_id="local/tiny",
            downloaded_bytes=5 * MB,
            total_bytes=10 * MB,
            completed_files=1,
            total_files=3,
        ),
        RunnerStatusUpdated(event_id="l", runner_id="r1", runner_status=RunnerLoading()),
        LoadProgress(
            event_id="p", runner_id="r1", model_id="local/tiny", task_id="t", layers_loaded=7, layers_total=20
        ),
        RunnerStatusUpdated(event_id="m", runner_id="r1", runner_status=RunnerLoaded()),
    ]
    return [Envelope(seq=i + 1, subject=subject, data=encode(m)) for i, m in enumerate(messages)]


def test_terminal_shows_download_and_load_bars() -> None:
    out = io.StringIO()
    bars = ProgressBars(out, force_terminal=True)
    events = _events()
    bars.on_event(events[0])
    bars.say("  r1: Downloading -> Loading")
    bars.on_event(events[1])
    bars.on_event(events[2])
    bars.stop()
    text = out.getvalue()
    assert "r1 download local/tiny" in text and " 50%" in text and "5.2/10.5 MB" in text
    assert "r1 load local/tiny" in text and " 35%" in text and "layer 7 of 20" in text
    assert "r1: Downloading -> Loading" in text


def test_a_finished_load_fills_its_bar() -> None:
    out = io.StringIO()
    bars = ProgressBars(out, force_terminal=True)
    for env in _events():
        bars.on_event(env)
    bars.stop()
    assert "layer 20 of 20" in out.getvalue() and "100%" in out.getvalue()


def test_without_a_terminal_only_the_plain_lines() -> None:
    out = io.StringIO()
    bars = ProgressBars(out)
    for env in _events():
        bars.on_event(env)
    bars.say("  r1: Loading -> Loaded")
    bars.stop()
    assert out.getvalue() == "  r1: Loading -> Loaded\n"
