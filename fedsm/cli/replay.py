"""``fedsm replay LOG``: a job's timeline, its state at a seq (``--at``), JSON (``--json``)
and verification of the log (``--verify``). The work is done by :mod:`fedsm.replay`."""

from __future__ import annotations

import argparse

from fedsm import replay


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="print a job log's timeline, state at a seq, or verify it",
        description=replay.__doc__.split("\n\n")[0] if replay.__doc__ else None,
    )
    replay.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return replay.run(args)
