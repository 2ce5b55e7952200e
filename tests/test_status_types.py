"""Statuses and query replies are types: a misspelt runner, instance or chat status is a type
error under the project's mypy settings (strict_equality), not a comparison that is silently never
true; a misspelt field of a supervisor's reply is one too, not a KeyError at run time."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api as mypy_api

from exojet.bus.lifecycle import ALL_STATUSES
from exojet.bus.statuses import RUNNER_STATUS_NAMES, RunnerStatusName

REPO = Path(__file__).resolve().parent.parent
SNIPPET = """
from exojet.bus.views import InstanceView, RunnerView

def check(runner: RunnerView, inst: InstanceView) -> bool:
    return runner.status == {runner!r} or inst.status == {instance!r}
"""


def _mypy(tmp_path: Path, runner: str, instance: str) -> str:
    module = tmp_path / "snippet.py"
    module.write_text(SNIPPET.format(runner=runner, instance=instance))
    out, err, _ = mypy_api.run(
        ["--config-file", str(REPO / "pyproject.toml"), "--strict-equality", "--no-incremental", str(module)]
    )
    return out + err


@pytest.mark.timeout(180)
def test_a_misspelt_status_is_a_type_error(tmp_path: Path) -> None:
    assert "Success" in _mypy(tmp_path, "RunnerIdle", "Placing")
    wrong = _mypy(tmp_path, "RunnerIdel", "Placin")
    assert wrong.count("Non-overlapping equality check") == 2, wrong


def test_the_runner_status_names_are_the_statuses_tags_and_the_lifecycles() -> None:
    assert RUNNER_STATUS_NAMES == ALL_STATUSES
    assert "RunnerLost" in RUNNER_STATUS_NAMES and len(set(RUNNER_STATUS_NAMES)) == len(RUNNER_STATUS_NAMES)
    assert RunnerStatusName.__args__ == RUNNER_STATUS_NAMES  # type: ignore[attr-defined]


REPLY_SNIPPET = """
from nats.aio.client import Client

from exojet.bus.nats.query_client import query


async def right(nc: Client) -> str:
    reply = await query(nc, "instance", instance_id="inst-1")
    return reply.instance.status + (reply.waiting or "")


async def misspelt(nc: Client) -> int:
    reply = await query(nc, "state")
    return reply.anomaly_cuont
"""


@pytest.mark.timeout(180)
def test_a_misspelt_reply_field_is_a_type_error(tmp_path: Path) -> None:
    module = tmp_path / "replies_snippet.py"
    module.write_text(REPLY_SNIPPET)
    out, err, _ = mypy_api.run(["--config-file", str(REPO / "pyproject.toml"), "--no-incremental", str(module)])
    errors = [line for line in (out + err).splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'StateReply" has no attribute "anomaly_cuont"' in errors[0], out + err
