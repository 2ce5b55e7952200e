"""What the soak (tests/test_soak.py) holds after each fault and at its end, Jepsen's way: from
what the clients were told (acknowledgements, answers) against what the log holds.

- every write a server acknowledged, to the test or to any exojet process (each logs its acks at
  DEBUG, "stored"), is in the stream at its sequence: in EXO_LOG (as our own fold saw it) on the
  same subject, and, at the end, under the same `Nats-Msg-Id`. An ack of a duplicate (a write
  under an id already stored) gives the first copy's sequence, whose subject may be another: two
  supervisors that routed one chat to different runners (each plans; the log keeps the first), so
  a duplicate is checked by its id at once;
- no task has two terminal statuses (at the end: every task exactly one);
- both supervisors' state hashes equal our fold's at the sequence each answered at;
- what a completed chat streamed is what EXO_CHUNKS holds of it, whole and once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from nats.aio.client import Client as NATS

from exojet.bus import streams
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.nats.query_client import QueryFailed, query
from exojet.projections.state import state_hash
from testbed.hosts_harness import SUPERVISORS, Deployment, Fold
from tests.soak_load import ChatRecord

# Chats that ended this close to EXO_CHUNKS's max age are not looked for: the read takes time.
CHUNKS_AGE_MARGIN_S = 300.0
# A process's "stored" line: `... stored  [stream=EXO_LOG seq=12 subject=exo.commands msg_id=x]`.
_STORED = re.compile(r" stored  \[(.*)\]$")


@dataclass(frozen=True)
class Ack:
    """A write a server acknowledged: where it said it stored it, and to whom."""

    stream: str
    seq: int
    subject: str
    msg_id: str | None
    by: str
    duplicate: bool = False


class SoakFold(Fold):
    """The fold, with each sequence's subject, and the state's hash at each sequence while asked."""

    def __init__(self) -> None:
        super().__init__()
        self.subjects: dict[int, str] = {}
        self.hashes: dict[int, str] = {}
        self.hashing = False
        # Duplicate acks already found under their ids in the stream.
        self.ids_checked: set[Ack] = set()
        self.hooks.append(self._on_folded)

    def _on_folded(self, env: Envelope) -> None:
        self.subjects[env.seq] = env.subject
        if self.hashing:
            self.hashes[env.seq] = state_hash(self.state)


class LoggedAcks:
    """The acknowledgements the exojet processes logged (their logs are `root/<host>.log`), read
    on from where the last `read` stopped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.acks: list[Ack] = []
        self._read_to: dict[Path, int] = {}

    def read(self) -> list[Ack]:
        for log in sorted(self.root.glob("*.log")):
            with open(log, "rb") as f:
                f.seek(self._read_to.get(log, 0))
                text = f.read()
            whole = text.rfind(b"\n") + 1  # a line being written is read next time
            self._read_to[log] = self._read_to.get(log, 0) + whole
            for line in text[:whole].decode(errors="replace").splitlines():
                if (m := _STORED.search(line)) is None:
                    continue
                fields = dict(kv.split("=", 1) for kv in m.group(1).split(" ") if "=" in kv)
                msg_id = None if fields["msg_id"] == "None" else fields["msg_id"]
                duplicate = fields.get("duplicate") == "True"
                ack = Ack(fields["stream"], int(fields["seq"]), fields["subject"], msg_id, log.stem, duplicate)
                self.acks.append(ack)
        return self.acks


def acks_of_test(d: Deployment) -> list[Ack]:
    return [Ack(streams.LOG_STREAM, seq, "exo.commands", msg_id, "test") for seq, msg_id in d.acked]


async def acks_in_fold(nc: NATS, fold: SoakFold, acks: list[Ack], what: str) -> None:
    """Every EXO_LOG ack is in our fold at its sequence: on its subject, or, for a duplicate, on
    any subject with the ack's `Nats-Msg-Id` (read from the stream: our fold has no headers)."""
    logged = [a for a in acks if a.stream == streams.LOG_STREAM]
    if not logged:
        return
    last = max(a.seq for a in logged)
    await fold.until(lambda s: s.seq >= last, 60, f"after {what}: our fold reaching acknowledged seq {last}")
    lost = [
        f"{a} (our fold has {fold.subjects.get(a.seq)} there)"
        for a in logged
        if a.seq not in fold.subjects or (not a.duplicate and fold.subjects[a.seq] != a.subject)
    ]
    assert not lost, f"after {what}: acknowledged writes not in the log as acknowledged: {lost[:10]}"
    duplicates = [a for a in logged if a.duplicate and a not in fold.ids_checked]
    await acks_under_their_ids(nc, duplicates)
    fold.ids_checked.update(duplicates)


async def acks_under_their_ids(nc: NATS, acks: list[Ack]) -> None:
    """Every ack with a `Nats-Msg-Id` is the message under that id at its sequence (the end's check)."""
    js = nc.jetstream()
    for ack in acks:
        if ack.msg_id is None:
            continue
        stored = await client.until_done(partial(js.get_msg, ack.stream, ack.seq), "get an acknowledged message")
        got = stored.headers.get("Nats-Msg-Id") if stored.headers else None
        assert got == ack.msg_id, f"{ack}: seq {ack.seq} of {ack.stream} holds {got}"


def terminal_counts_at_most_one(fold: Fold, what: str) -> None:
    twice = [t for t, n in fold.terminal_statuses().items() if n > 1]
    assert not twice, f"after {what}: tasks with more than one terminal status: {twice[:10]}"


def terminal_counts_exactly_one(fold: Fold) -> None:
    counts = fold.terminal_statuses()
    missing = set(fold.state.tasks) - set(counts)
    assert not missing, f"tasks without a terminal status: {sorted(missing)[:10]}"
    terminal_counts_at_most_one(fold, "the run")


async def supervisors_agree(nc: NATS, fold: SoakFold, what: str, bound: float = 120.0) -> None:
    """Each supervisor's state hash, at the sequence it answers at, is our fold's there (the log
    moves on under load: our fold hashes each sequence while this asks)."""
    fold.hashing = True
    start = fold.state.seq
    fold.hashes[start] = state_hash(fold.state)
    seen: dict[str, int] = {}
    try:
        async with asyncio.timeout(bound):
            while set(seen) != set(SUPERVISORS):
                try:
                    reply = await query(nc, "state", timeout=5.0, min_seq=start, hash=True, limit=1)
                except QueryFailed:
                    continue
                seq, by = reply.seq, reply.supervisor_id
                assert isinstance(by, str) and isinstance(reply.state_hash, str), reply
                await fold.until(lambda s, seq=seq: s.seq >= seq, 60, f"after {what}: our fold reaching seq {seq}")
                assert reply.state_hash == fold.hashes[seq], (
                    f"after {what}: supervisor {by}'s state at seq {seq} is not our fold's"
                )
                seen[by] = seq
    except TimeoutError:
        raise AssertionError(f"after {what}: only {sorted(seen)} answered within {bound} s") from None
    finally:
        fold.hashing = False
        fold.hashes.clear()


async def chats_stored_whole(nc: NATS, chats: list[ChatRecord]) -> None:
    """What each completed chat streamed is EXO_CHUNKS's every index from 0 to its `done`, once each;
    for chats that ended within EXO_CHUNKS's max age (older ones may be gone, as it promises)."""
    texts: dict[str, dict[int, list[str]]] = defaultdict(dict)
    done: dict[str, list[int]] = defaultdict(list)

    def on_chunk(env: Envelope) -> None:
        chat_id = env.subject.rsplit(".", 1)[-1]
        chunk = json.loads(env.data)
        texts[chat_id].setdefault(chunk["index"], []).append(chunk.get("text", ""))
        if chunk.get("done"):
            done[chat_id].append(chunk["index"])

    kept_since = time.monotonic() - streams.CHUNKS_MAX_AGE_S + CHUNKS_AGE_MARGIN_S
    await client.replay(nc, on_chunk, stream=streams.CHUNKS_STREAM, timeout=120)
    for chat in chats:
        if chat.outcome != "completed" or chat.started < kept_since:
            continue
        assert chat.chat_id is not None, chat
        held, ends = texts[chat.chat_id], done[chat.chat_id]
        assert len(ends) == 1 and sorted(held) == list(range(ends[0] + 1)), (chat.chat_id, sorted(held), ends)
        assert all(len(copies) == 1 for copies in held.values()), f"{chat.chat_id}: an index stored twice"
        stored = "".join(held[i][0] for i in range(ends[0] + 1))
        assert chat.text == stored, (chat.chat_id, chat.text, stored)
