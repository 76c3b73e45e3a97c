"""``fedsm replay LOG``: a job's timeline and its head, its state at a seq (``--at``), one
round in detail (``--round``), JSON (``--json``) and the audit of the log (``--verify``): with
``--repo`` also of the run's files, with ``--witness`` against the heads the nodes kept, with
``--expect-head`` against a head written down by hand. The work is done by
:mod:`fedsm.audit.replay` and :mod:`fedsm.audit.witness`."""

from __future__ import annotations

import argparse

from fedsm.audit import replay


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="print a job log's timeline and head, state at a seq or a round; audit it "
        "(--verify, --witness)",
        description="A job's timeline (one line per record, then the log's head), its state "
        "after a seq (--at), one round in detail (--round), as JSON (--json); or the audit of "
        "the log (--verify): framing, checksums, hash chain, lifecycle, plan and validation "
        "rounds, with --repo also every artifact and every aggregate recomputed, with --witness "
        "against the heads the nodes kept, with --expect-head against a head written down by "
        "hand. LOG is a job log or a run directory; nothing is ever written to it.",
    )
    replay.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return replay.run(args)
