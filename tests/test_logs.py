"""Every process's log line: bound fields shown as k=v, whatever they hold."""

from __future__ import annotations

import sys

import pytest
from loguru import logger

from exojet.cli.logs import setup_logging


def test_bound_fields_holding_braces_and_markup_are_shown_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    try:
        # A task id is the user's string: a format built from it broke on braces and tags.
        logger.bind(runner_id="r1", task_id="{weird} <red>x</red>").info("task {x} ran")
        logger.info("no fields")
    finally:
        # Back to loguru's own default for the tests after this one.
        logger.remove()
        logger.configure(patcher=None)
        logger.add(sys.stderr)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("task {x} ran  [runner_id=r1 task_id={weird} <red>x</red>]"), lines
    assert lines[1].endswith("no fields"), lines
    assert "Logging error" not in "\n".join(lines)
