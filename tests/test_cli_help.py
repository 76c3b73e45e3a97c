"""``fedsm ... --help`` is plain text for a terminal, and ``fedsm --version`` is the package's.

Every command, sub-command and action of the argparse tree from ``build_parser()`` is walked,
its ``--help`` run as a user runs it, and its text checked for reST markup (docstring syntax
that leaks into help through ``description=__doc__`` or copied sentences): ````double
backticks````, roles such as ``:class:`` or ``:func:``, and `single backticks` around a name.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import fedsm
from fedsm.cli import build_parser, main

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|ref|doc|term|py:\w+):")
DOUBLE_BACKTICKS = re.compile(r"``")
SINGLE_BACKTICKS = re.compile(r"(?<![`\w])`[^`\s][^`]*`(?![`\w])")

# Help texts found with markup (the command, without "fedsm"), being fixed by the lead.
# Remove an entry once its help is plain (an entry left behind shows up as XPASS).
MARKUP_BEING_FIXED: frozenset[str] = frozenset()


def _commands() -> list[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("node",), ("node", "plan", "approve"), ..."""
    found: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        found.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))

    walk(build_parser(), ())
    return found


COMMANDS = _commands()


def _markup(text: str) -> list[str]:
    return [
        match.group(0)
        for pattern in (DOUBLE_BACKTICKS, ROLE, SINGLE_BACKTICKS)
        for match in pattern.finditer(text)
    ]


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_the_tree_holds_every_command() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"", "plan", "plan hash", "node plan approve"} <= names
    assert len(COMMANDS) == len(names)  # no command reached twice


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            path,
            id=" ".join(("fedsm", *path)),
            marks=[pytest.mark.xfail(reason="help text being fixed by the lead", strict=False)]
            if " ".join(path) in MARKUP_BEING_FIXED
            else [],
        )
        for path in COMMANDS
    ],
)
def test_help_is_plain_text(path: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    text = _help(path, capsys)
    assert text.startswith("usage: fedsm")
    assert _markup(text) == [], text


@pytest.mark.parametrize(
    ("text", "marked"),
    [
        ("uses ``--dir``", True),
        ("see :class:`Job`", True),
        ("see :func:`plan_source`", True),
        ("the `node` directory", True),
        ("the node directory (default: ./node)", False),
        ("it's the researcher's log", False),
        ("mqtt://[user[:pass]@]host:port", False),
    ],
)
def test_the_markup_check_itself(text: str, marked: bool) -> None:
    assert bool(_markup(text)) is marked


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == f"fedsm {fedsm.__version__}\n"
    assert fedsm.__version__ == version("fedsm")


def test_version_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedsm", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fedsm {fedsm.__version__}"
