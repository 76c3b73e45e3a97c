"""The ``fedsm`` command line. Each sub-command lives in its own module with a ``register``
function that adds its parser; this module only dispatches and turns fedsm's errors into a
one-line message and an exit code (the only place fedsm calls exit)."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence

from fedsm.errors import FedsmError

# Sub-command modules, in the order of ``fedsm --help``.
_COMMANDS = ("check", "demo", "log", "node", "plan", "repo", "replay", "report")


def plain_text(doc: str | None) -> str | None:
    """A docstring as ``--help`` text: reST roles and literals (``x``, :mod:`x`, `x`) as
    plain words, so the help reads as it prints."""
    if doc is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return text.replace("``", "").replace("`", "")


def _version() -> str:
    from fedsm import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsm",
        description="Federated learning with an event-sourced, replayable job lifecycle.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"fedsm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"fedsm.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except FedsmError as exc:
        print(f"fedsm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedsm replay LOG | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
