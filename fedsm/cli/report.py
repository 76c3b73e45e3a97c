"""``fedsm report LOG --out report.html``: training curves, metrics and round timing of a
run, as a self-contained HTML page or a PNG. The work is done by :mod:`fedsm.audit.report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsm.audit import report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plot a job log's per-round metrics and timing (HTML or PNG)",
        description=report.__doc__.split("\n\n")[0] if report.__doc__ else None,
    )
    p.add_argument("log", type=Path, help="the job's event log (e.g. RUN_DIR/researcher/job.log)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write: .html (self-contained) or .png (default: report.html next to LOG)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.log.with_name("report.html")
    written = report.write_report(args.log, out)
    print(f"report={written}")
    return 0
