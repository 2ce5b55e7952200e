"""Query replies are structs (bus/replies.py) built by the projection's answers and decoded once by
the query client; the wire is what it was: every reply to the format-1 fixture's cluster, at every
sequence, encodes to the bytes recorded before the replies were typed, and decodes back to itself."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import msgspec

from exojet.bus.ops.archive import read_archive
from exojet.bus.replies import InstanceReply, RefusalReply, RunnerReply, StateReply, TaskReply
from exojet.projections.apply import apply
from exojet.projections.queries import Filters, Paging, instance_reply, runner_reply, state_reply, task_reply
from exojet.projections.state import ClusterState

FIXTURES = Path(__file__).parent / "fixtures"
# Recorded from the untyped answers (dicts of the projection's views), before bus/replies.py; again
# when runners gained `capabilities` (the only change: that field in each runner, and so the hashes),
# and when instances gained `failed_unready` (that field, and the hashes).
RECORDED = FIXTURES / "replies-format-1.jsonl.gz"


def _replies() -> Iterator[StateReply | RunnerReply | TaskReply | InstanceReply]:
    """Every answer after each message of the format-1 log: state (whole, hashed; one filtered page),
    each runner (a page of 3 tasks), each task, each instance."""
    state = ClusterState()
    for env in read_archive(FIXTURES / "log-format-1.jsonl.gz"):
        state = apply(state, env)
        yield state_reply(state, with_hash=True)
        yield state_reply(state, Paging(offset=1, limit=2), Filters(sections=("tasks",), runner_status="RunnerReady"))
        yield from (runner_reply(state, r, Paging(limit=3)) for r in sorted(state.runners))
        yield from (task_reply(state, t) for t in state.tasks)
        yield from (instance_reply(state, i) for i in state.instances)


def test_every_reply_to_the_format_1_cluster_is_the_bytes_it_was_and_decodes_to_itself() -> None:
    recorded = gzip.decompress(RECORDED.read_bytes()).splitlines()
    assert len(recorded) == 336
    kinds = set()
    # Each encoded as it is made, as the service does: the fold updates its views in place.
    for reply, before in zip(_replies(), recorded, strict=True):
        encoded = msgspec.json.encode(reply)
        assert encoded == before
        assert msgspec.json.decode(encoded, type=type(reply)) == reply
        kinds.add(type(reply).__name__)
    assert kinds == {"StateReply", "RunnerReply", "TaskReply", "InstanceReply"}


def test_a_reply_without_the_fields_an_older_supervisor_never_sent_still_reads() -> None:
    old = msgspec.json.decode(b'{"seq": 7, "runners": {}, "tasks": {}, "instances": {}}', type=StateReply)
    assert (old.seq, old.waiting, old.tasks_page.next_offset, old.supervisor_id) == (7, {}, None, msgspec.UNSET)
    refused = msgspec.json.decode(b'{"seq": 3, "error": {"type": "NotFound", "message": "no task"}}', type=RefusalReply)
    assert (refused.error.type, refused.error.message) == ("NotFound", "no task")
