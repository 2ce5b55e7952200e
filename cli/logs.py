"""Log format for every `exojet` process: structured fields (runner, task, seq) on each line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    # Only in loguru's stubs.
    from loguru import Record

FORMAT = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{name}</cyan> {message}<dim>{extra}</dim>"


def _with_extra(record: Record) -> str:
    fields = " ".join(f"{k}={v}" for k, v in record["extra"].items())
    return FORMAT.replace("{extra}", f"  [{fields}]" if fields else "") + "\n{exception}"


def setup_logging() -> None:
    """loguru to stderr at $EXOJET_LOG_LEVEL (default INFO), bound fields shown as k=v."""
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("EXOJET_LOG_LEVEL", "INFO"), format=_with_extra)
