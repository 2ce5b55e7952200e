"""The message format's version, which every task, event and command carries as `format`.

A reader decodes every older format: fields are only ever added, with defaults,
and unknown fields are ignored. `format` itself is such a field, added in format
1; its default stays 1 for good, because a message without it was written before
messages said their format. A change a reader must know about bumps
`FORMAT_VERSION`, which writers then put in every message.
"""

from __future__ import annotations

import msgspec

FORMAT_VERSION = 1


# Subclasses repeat frozen=True: msgspec inherits it, type checkers (PEP 681) do not.
class LogMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every message in `EXO_LOG`."""

    format: int = 1
