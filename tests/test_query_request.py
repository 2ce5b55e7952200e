"""A query's body is one struct (bus/queries.py) for the client and the supervisors: only what
the asker set goes on the wire, and a misspelt field fails where it is written."""

from __future__ import annotations

import msgspec
import pytest
from nats.aio.client import Client as NATS

from exojet.bus.nats.query_client import query
from exojet.bus.queries import QueryRequest


def test_only_the_fields_set_go_on_the_wire_and_the_service_reads_them_back() -> None:
    assert msgspec.json.encode(QueryRequest()) == b"{}"
    asked = QueryRequest(min_seq=7, sections=("runners",), limit=3)
    assert msgspec.json.decode(msgspec.json.encode(asked), type=QueryRequest) == asked


async def test_a_misspelt_query_field_fails_before_anything_is_sent(nc: NATS) -> None:
    with pytest.raises(TypeError, match="instance_di"):
        await query(nc, "instance", instance_di="inst-1", wait=0.1)
