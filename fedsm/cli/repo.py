"""`fedsm repo`: not built yet (see the open issues)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repo", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("fedsm repo is not built yet: see the project's open issues.", file=sys.stderr)
    return 3
