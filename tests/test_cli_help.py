"""Every option of every `exojet` subcommand says in `--help` what it does."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from exojet.cli.main import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "exojet") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_of_every_subcommand_has_help() -> None:
    parsers = dict(_parsers(build_parser()))
    assert {"exojet up", "exojet api", "exojet nats", "exojet log export", "exojet models import-gguf"} <= set(parsers)
    missing = [
        f"{name}: {'/'.join(action.option_strings) or action.dest}"
        for name, parser in parsers.items()
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == [], "arguments without help:\n" + "\n".join(missing)


def test_every_command_registers_its_handler() -> None:
    leaves = {
        name: parser
        for name, parser in _parsers(build_parser())
        if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    }
    assert {"exojet up", "exojet auth init", "exojet log export", "exojet models list"} <= set(leaves)
    without = [name for name, parser in leaves.items() if not callable(parser.get_default("func"))]
    assert without == [], "commands without a handler: " + ", ".join(without)
