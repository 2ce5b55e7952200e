"""Log format for every `exojet` process: structured fields (runner, task, seq) on each line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    # Only in loguru's stubs.
    from loguru import Record

# The bound fields come in through a patcher, as a format argument: a task id holding braces or
# markup is shown as it is, and the format is a constant loguru parses once (a format function
# is parsed again on every line: 18% of a busy runner's time).
FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{name}</cyan> "
    "{message}<dim>{extra[_fields]}</dim>"
)


def _with_fields(record: Record) -> None:
    fields = " ".join(f"{k}={v}" for k, v in record["extra"].items() if k != "_fields")
    record["extra"]["_fields"] = f"  [{fields}]" if fields else ""


def setup_logging() -> None:
    """loguru to stderr at $EXOJET_LOG_LEVEL (default INFO), bound fields shown as k=v."""
    logger.remove()
    logger.configure(patcher=_with_fields)
    logger.add(sys.stderr, level=os.environ.get("EXOJET_LOG_LEVEL", "INFO"), format=FORMAT)
