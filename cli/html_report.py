"""`exojet replay --html FILE`: the log's timeline as one self-contained HTML file, for bug reports.

Every mark carries its message; the cluster state after it (the Python fold's, as `exojet state`
shows it) is embedded for the newest marks that fit in `max_bytes`; older ones name the command
that rebuilds theirs. No second implementation of `apply` runs in the browser.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from exojet.api.page import report_html
from exojet.bus.envelope import Envelope
from exojet.projections.queries import Paging, state_reply
from exojet.projections.state import ClusterState
from exojet.projections.timeline import Mark, fold
from exojet.projections.words import envelope_json

# The newest marks a report draws (older messages: `exojet replay --to`).
MAX_MARKS = 5000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# Runners, instances and tasks listed in each embedded state.
STATE_LIMIT = 50


class HtmlReport:
    """Fed every message of the log in order (it folds them); `write` saves the file."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.state = ClusterState()
        self.marks: deque[Mark] = deque(maxlen=MAX_MARKS)
        self.events: dict[int, Any] = {}
        # (seq, the encoded state after it), newest last, within max_bytes.
        self.states: deque[tuple[int, bytes]] = deque()
        self._state_bytes = 0

    def on_env(self, env: Envelope) -> None:
        self.state, folded = fold(self.state, env)
        if len(self.marks) == MAX_MARKS:
            self.events.pop(self.marks[0].seq, None)
        self.marks.append(folded.mark)
        self.events[env.seq] = envelope_json(env)
        encoded = msgspec.json.encode(state_reply(self.state, Paging(offset=0, limit=STATE_LIMIT)))
        self.states.append((env.seq, encoded))
        self._state_bytes += len(encoded)
        while self._state_bytes > self.max_bytes and self.states:
            self._state_bytes -= len(self.states.popleft()[1])

    def write(self, path: Path, title: str) -> int:
        """Write the file; returns how many marks have their state embedded."""
        states = {seq: msgspec.json.decode(data) for seq, data in self.states}
        details = {
            m.seq: {"event": self.events[m.seq], "state": states[m.seq]}
            if m.seq in states
            else {
                "event": self.events[m.seq],
                "note": f"state not embedded (over the report's size cap): exojet replay --to {m.seq} --state",
            }
            for m in self.marks
        }
        path.write_text(report_html(title, list(self.marks), details))
        return len(states)
