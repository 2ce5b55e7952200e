"""One line per log message for `exojet replay` (the words come from projections/words.py)."""

from __future__ import annotations

import datetime

from exojet.bus.envelope import Envelope


def timeline_line(env: Envelope, kind: str, words: str) -> str:
    """`seq  time  subject  type  words`."""
    when = datetime.datetime.fromtimestamp(env.time).strftime("%H:%M:%S.%f")[:-3] if env.time else "-"
    return f"{env.seq:>7}  {when}  {env.subject:<28}  {kind:<20}  {words}"
