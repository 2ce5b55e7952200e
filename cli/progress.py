"""Download and load progress bars (rich) from the log's events, for `up` and `place --wait`.

On a terminal: one bar per runner and model while it downloads (size, %, MB/s, ETA, from
`DownloadProgress`) and one while it loads ("layer k of n", from `LoadProgress`; `RunnerLoading`
starts it, the next status ends it).
Without a terminal nothing but the plain transition lines is printed, one per line, as scripts
expect (`Ready in ...`).
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Task as BarTask
from rich.text import Text

from exojet.bus.envelope import Envelope
from exojet.bus.events import DownloadProgress, LoadProgress, RunnerStatusUpdated
from exojet.bus.lifecycle import LOADING
from exojet.bus.statuses import status_name
from exojet.projections.words import load_words, message_of


class _AmountColumn(ProgressColumn):
    """Bytes and speed for a download bar; "layer k of n" for a load bar."""

    def __init__(self) -> None:
        super().__init__()
        self.size = DownloadColumn()
        self.speed = TransferSpeedColumn()

    def render(self, task: BarTask) -> Text:
        if task.fields.get("load"):
            return Text(load_words(int(task.completed), int(task.total)) if task.total else "")
        return Text.assemble(self.size.render(task), " ", self.speed.render(task))


class ProgressBars:
    """Feed it the runners' events; `say` prints a transition line above the bars."""

    def __init__(self, file: TextIO | None = None, force_terminal: bool | None = None) -> None:
        self.file = file or sys.stderr
        self.console = Console(file=self.file, force_terminal=force_terminal)
        self.live = self.console.is_terminal
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            _AmountColumn(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._downloads: dict[tuple[str, str], TaskID] = {}
        self._loads: dict[str, TaskID] = {}
        if self.live:
            self.bars.start()

    def on_event(self, env: Envelope) -> None:
        """Move the bar an event is about (a no-op without a terminal)."""
        if not self.live:
            return
        match message_of(env):
            case DownloadProgress(runner_id=rid, model_id=mid, downloaded_bytes=got, total_bytes=total):
                key = (rid, mid)
                if key not in self._downloads:
                    self._downloads[key] = self.bars.add_task(f"{rid} download {mid}", total=total or None)
                self.bars.update(self._downloads[key], completed=got, total=total or None)
            case LoadProgress(runner_id=rid, model_id=mid, layers_loaded=done, layers_total=total):
                if rid not in self._loads:
                    self._loads[rid] = self.bars.add_task(f"{rid} load", total=None, load=True)
                self.bars.update(self._loads[rid], description=f"{rid} load {mid}", completed=done, total=total)
            case RunnerStatusUpdated(runner_id=rid, runner_status=status):
                if status_name(status) == LOADING:
                    self._loads[rid] = self.bars.add_task(f"{rid} load", total=None, load=True)
                elif rid in self._loads:
                    bar_id = self._loads.pop(rid)
                    layers = next(t.total for t in self.bars.tasks if t.id == bar_id) or 1
                    self.bars.update(bar_id, total=layers, completed=layers)

    def say(self, line: str) -> None:
        """Print one line (above the bars on a terminal)."""
        if self.live:
            self.bars.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.file, flush=True)

    def stop(self) -> None:
        if self.live:
            self.bars.stop()
