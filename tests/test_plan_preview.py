"""`exojet replay --plan`: this planner's decisions against those a recorded log shows, as sets
named by id, timing ignored; the recorded fixtures' differences are approved in a checked-in file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exojet.bus.commands import RouteChatCompletion
from exojet.bus.ops.archive import replay_archive
from exojet.bus.tasks import ChatMessage
from exojet.supervisor.actions import PlannerConfig
from exojet.supervisor.plan_preview import plan_differences
from exojet.supervisor.planner import plan
from testbed import REPO
from tests.planner_cluster import Cluster, ready_single

FIXTURES = Path(__file__).parent / "fixtures"
APPROVED = FIXTURES / "plan-approved.txt"


def _approved() -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in APPROVED.read_text().splitlines():
        if line and not line.startswith("#"):
            name, words = line.split(" ", 1)
            lines.setdefault(name, []).append(words)
    return lines


@pytest.mark.parametrize("archive", sorted(FIXTURES.glob("log-*.jsonl.gz")), ids=lambda p: p.name)
def test_a_recorded_log_differs_only_as_approved(archive: Path) -> None:
    envs: list = []
    replay_archive(archive, envs.append)
    found = [f"seq {d.seq}: {d.words}" for d in plan_differences(envs)]
    approved = _approved().get(archive.name, [])
    assert found == approved, (
        f"the planner decides differently on {archive.name} than {APPROVED.name} approves; if intended, "
        "approve these lines there:\n" + "\n".join(f"{archive.name} {line}" for line in found)
    )


def _chats_log() -> Cluster:
    """A log this planner wrote: one runner serving one chat at a time, three chats routed."""
    c = Cluster()
    c.register("r1")
    ready_single(c, "r1")
    for k in range(3):
        c.command(RouteChatCompletion(command_id=f"c{k}", messages=(ChatMessage("user", f"hi {k}"),)))
    c.publish(plan(c.state))
    return c


def test_a_log_this_planner_wrote_replays_with_no_difference() -> None:
    assert plan_differences(_chats_log().log) == []


def test_a_planner_that_queues_less_shows_each_decision_it_would_change() -> None:
    words = [d.words for d in plan_differences(_chats_log().log, config=PlannerConfig(max_chats_per_instance=1))]
    assert words == [
        "this planner would write ChatRefused for chat-c2 (chat-c2:refused); the log never did",
        "the log did send ChatCompletion chat-c2.0 to r1; this planner would not have by then",
    ]


def test_replay_plan_prints_the_differences_in_words() -> None:
    archive = FIXTURES / "log-format-1.jsonl.gz"
    out = subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", "replay", "--plan", "--file", str(archive)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        *_approved()[archive.name],
        "2 decisions differ from the log's (43 messages replayed)",
    ]
