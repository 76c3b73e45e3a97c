"""``fedsm replay LOG``: a job's timeline, its state at a seq (``--at``), one round in detail
(``--round``), JSON (``--json``) and the audit of the log and, with ``--repo``, of the run's
files (``--verify``). The work is done by :mod:`fedsm.audit.replay`."""

from __future__ import annotations

import argparse

from fedsm.audit import replay


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="print a job log's timeline, state at a seq or a round; audit it (--verify)",
        description=replay.__doc__.split("\n\n")[0] if replay.__doc__ else None,
    )
    replay.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return replay.run(args)
