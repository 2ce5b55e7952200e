"""A query of the supervisors (`exo.supervisor.*`): the request body, one struct for the client
(bus/nats/query_client.py) and the service (supervisor/service.py). Replies: bus/replies.py."""

from __future__ import annotations

import msgspec

DEFAULT_MIN_SEQ_TIMEOUT_S = 5.0
DEFAULT_LIMIT = 100
# A page of 500 tasks is about 300 KB: far below the 1 MB a default server allows.
MAX_LIMIT = 500
SECTIONS = ("runners", "instances", "tasks")


# Only what the asker set goes on the wire (`nats req exo.supervisor.state ''` asks with none).
class QueryRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    # Answer once the projection has folded this sequence (waiting up to `timeout` seconds).
    min_seq: int = 0
    timeout: float = DEFAULT_MIN_SEQ_TIMEOUT_S
    runner_id: str | None = None
    task_id: str | None = None
    instance_id: str | None = None
    # Paging of the collections a reply lists (see projections/queries.py).
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    # `state` adds the whole state's digest (a full encode: slow on a large state).
    hash: bool = False
    sections: tuple[str, ...] = SECTIONS
    runner_status: str | None = None
    instance_status: str | None = None
