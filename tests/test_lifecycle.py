"""bus/lifecycle.py against DESIGN.md's state-machine table (and the rows docs/design-notes.md adds),
cell by cell, and the rules derived from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from exojet.bus.lifecycle import FAILED, LIFECYCLE, TaskLifecycle
from exojet.projections.rules import transition_allowed
from testbed import REPO

pytestmark = pytest.mark.timeout(10)

# The contract lives in the workspace beside the checkout; a verbatim copy is kept here
# so that a clone on its own (CI) compares against the same table instead of skipping.
SHARED_DESIGN = REPO.parent / "shared" / "DESIGN.md"
DESIGN = Path(__file__).resolve().parent / "contract" / "DESIGN.md"
NOTES = REPO / "docs" / "design-notes.md"
HEADER = ["task", "accepted in", "then"]


def _short(status: str) -> str:
    return status.removeprefix("Runner")


def render(row: TaskLifecycle) -> list[str]:
    """The row as DESIGN.md writes it."""
    if row.accepted_in is None:
        accepted = "any"
    else:
        because = row.accepted_because
        parts = [_short(s) + (f" ({because[s]})" if s in because else "") for s in row.accepted_in]
        accepted = (" or " if because else ", ").join(parts)
    if row.requires:
        accepted += f"; {row.requires}"
    if row.success is None:
        after = ", ".join(f"{_short(end)} after {_short(before)}" for before, end in row.success_from.items())
        end = "back where it was" + (f" ({after})" if after else "")
    else:
        end = _short(row.success)
    if row.ends_process:
        end += ", process exits"
    then = f"{_short(row.working)} -> {end}" if row.working else end
    return [row.task, accepted, then]


def state_machine_rows(text: str, heading: str) -> list[list[str]]:
    """The body of the first table under `heading`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert table[0] == HEADER, table[0]
    return table[2:]


def documented_rows() -> list[list[str]]:
    return state_machine_rows(DESIGN.read_text(), "## The runner's state machine") + state_machine_rows(
        NOTES.read_text(), "## The runner's state machine: added rows"
    )


def test_the_kept_copy_of_the_contract_is_the_contract() -> None:
    if not SHARED_DESIGN.exists():
        pytest.skip(f"{SHARED_DESIGN} (the workspace's contract) is not next to this checkout")
    assert DESIGN.read_bytes() == SHARED_DESIGN.read_bytes(), f"copy {SHARED_DESIGN} to {DESIGN}"


def test_lifecycle_renders_designs_table_cell_by_cell() -> None:
    documented = documented_rows()
    assert sorted(row[0] for row in documented) == sorted(LIFECYCLE)
    for row in documented:
        rendered = render(LIFECYCLE[row[0]])
        for column, want, got in zip(HEADER, row, rendered, strict=True):
            assert got == want, (row[0], column)


def test_a_changed_lifecycle_no_longer_renders_the_table() -> None:
    documented = {row[0]: row for row in documented_rows()}
    changed = TaskLifecycle("StartWarmup", ("RunnerLoaded", "RunnerIdle"), "RunnerWarmingUp", "RunnerReady")
    assert render(changed) != documented["StartWarmup"]


@pytest.mark.parametrize("row", LIFECYCLE.values(), ids=list(LIFECYCLE))
def test_projection_rules_follow_every_row(row: TaskLifecycle) -> None:
    for before in row.accepting_statuses():
        first = row.working or row.succeeded(before)
        assert transition_allowed(before, first), (before, first)
        last = row.working or before
        assert transition_allowed(last, row.succeeded(before)) and transition_allowed(last, FAILED)


def test_projection_rules_refuse_what_no_row_does() -> None:
    assert not transition_allowed("RunnerIdle", "RunnerReady")
    assert not transition_allowed("RunnerIdle", "RunnerFailed")
    assert not transition_allowed("RunnerShutdown", "RunnerIdle")
    assert not transition_allowed("RunnerLost", "RunnerIdle")
    assert transition_allowed("Unregistered", "RunnerIdle")
