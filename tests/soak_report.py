"""The soak's table (tests/test_soak.py): faults by kind, chats served and failed, time to recover
after each kind (p50/p99) and the slowest recovery with what it waited on."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tests.soak_load import Load
from tests.soak_schedule import Fault


@dataclass
class Recovery:
    """One fault and how the cluster came back from it: seconds from the fault's start to the
    first chat answered through the API (while it lasted, if the cluster got round it); from its
    end to a chat answered again, then to both supervisors on our fold's state (the recovery)."""

    fault: Fault
    done: str
    unanswered_s: float = 0.0
    answered_s: float = 0.0
    agreed_s: float = 0.0
    # What the probe chats met before one was answered, in order.
    errors: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.answered_s + self.agreed_s

    def why(self) -> str:
        met = ", ".join(f"{e} x{n}" for e, n in Counter(self.errors).items()) or "no failed probe"
        return (
            f"{self.fault}: {self.done}; chats unanswered {self.unanswered_s:.1f} s from its start; "
            f"from its end a chat answered after {self.answered_s:.1f} s ({met}), "
            f"both supervisors on our state {self.agreed_s:.1f} s later"
        )


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (a short list's p99 is its maximum)."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(q / 100 * len(ranked) + 0.5) - 1))]


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {_pct(values, 99):.1f} / {max(values):.1f}"


def table(seed: int, minutes: float, elapsed_s: float, recoveries: list[Recovery], load: Load) -> str:
    by_kind: dict[str, list[Recovery]] = defaultdict(list)
    for r in recoveries:
        by_kind[r.fault.kind].append(r)
    outcomes = Counter(c.outcome for c in load.chats)
    lines = [
        f"soak seed {seed}, {minutes:g} min asked, {elapsed_s / 60:.1f} min run, {len(recoveries)} faults",
        "| fault | injected | recovery from its end, p50 / p99 / max (s) | unanswered from its start, same (s) |",
        "|---|---|---|---|",
    ]
    for kind, recs in sorted(by_kind.items()):
        recovered, unanswered = _spread([r.seconds for r in recs]), _spread([r.unanswered_s for r in recs])
        lines.append(f"| {kind} | {len(recs)} | {recovered} | {unanswered} |")
    targets = Counter(f"{r.fault.kind} {r.fault.target}" for r in recoveries)
    lines.append("faults by target: " + ", ".join(f"{t} {n}" for t, n in sorted(targets.items())))
    lines.append(
        f"chats: {outcomes['completed']} served, {outcomes['cancelled']} cancelled by their client, "
        f"{outcomes['failed']} failed, {outcomes['hung']} hung"
    )
    for error, n in load.failures().most_common():
        lines.append(f"  failed with {error}: {n}")
    # The client's own errors name nothing the API said: each is listed with what it said.
    for chat in load.chats:
        if chat.outcome == "failed" and not chat.error[:1].isdigit() and not chat.error.startswith("stream"):
            lines.append(f"    chat {chat.n} ({chat.tokens} tokens): {chat.detail}")
    lines.append("commands: " + ", ".join(f"{op} {n}" for op, n in sorted(load.ops.items())))
    if recoveries:
        lines.append("slowest recovery: " + max(recoveries, key=lambda r: r.seconds).why())
    return "\n".join(lines)
