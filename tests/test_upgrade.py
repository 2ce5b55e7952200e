"""A newer exojet reads every older log: the fixture recorded before messages carried their format."""

from __future__ import annotations

from pathlib import Path

import pytest

from exojet.bus import subjects
from exojet.bus.codec import BadInput, decode_command, decode_event, decode_task, encode
from exojet.bus.formats import FORMAT_VERSION
from exojet.bus.ops.archive import read_archive
from exojet.bus.statuses import TaskStatus
from exojet.bus.tasks import StartWarmup
from exojet.projections.apply import apply
from exojet.projections.checks import check
from exojet.projections.state import ClusterState

pytestmark = pytest.mark.timeout(60)

# Recorded by tests/fixtures/record_log.py from a real supervisor and runner, format 1
# (before messages said so).
FORMAT_1_LOG = Path(__file__).parent / "fixtures" / "log-format-1.jsonl.gz"


def _decode(subject: str, data: bytes) -> object:
    if subject.startswith(subjects.TASKS_PREFIX + "."):
        return decode_task(data)
    if subject == subjects.COMMANDS:
        return decode_command(data)
    return decode_event(data)


def test_a_format_1_log_decodes_and_folds_to_what_it_recorded() -> None:
    envs = list(read_archive(FORMAT_1_LOG))
    assert [e.seq for e in envs] == list(range(1, len(envs) + 1))
    refused = []
    for env in envs:
        assert b'"format"' not in env.data  # recorded before the field existed
        try:
            message = _decode(env.subject, env.data)
        except BadInput as err:
            refused.append((env.seq, err.error_type))
            continue
        assert message.format == 1  # type: ignore[attr-defined]  # absent means format 1
    assert refused == [(32, "NotJson")]  # the one the recording sent on purpose

    state = ClusterState()
    for env in envs:
        state = apply(state, env)
    assert state.runners["r1"].status == "RunnerShutdown"
    assert state.instances["inst-p1"].status == "Deleted"
    assert state.chats["chat-q1"].status == "Complete"
    assert state.tasks["c1"].status == TaskStatus.COMPLETE and state.tasks["c1"].result is not None
    assert state.tasks["inst-p1.a1.unload.r1"].status == TaskStatus.COMPLETE
    report = check(state)
    assert [a.kind for a in report.anomalies] == ["BadTask"]
    assert not report.unfinished_tasks and not report.stuck_runners


def test_messages_written_today_say_their_format() -> None:
    data = encode(StartWarmup(task_id="w"))
    assert f'"format":{FORMAT_VERSION}'.encode() in data
    assert decode_task(data).format == FORMAT_VERSION
