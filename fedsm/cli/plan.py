"""``fedsm plan ...``: training plans as a researcher sees them (being built)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Nothing yet: the sub-command is being written."""
