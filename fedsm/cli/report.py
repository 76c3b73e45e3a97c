"""``fedsm report LOG --out report.html``: training curves, metrics and round timing of a
run, as a self-contained HTML page or a PNG, and its per-round data as CSV or JSON. Without
``--out`` it prints the run's configuration, final metrics and audit command, and writes
nothing: the report never writes next to what it reads. The work is done by
:mod:`fedsm.audit.report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsm.audit import report
from fedsm.cli import plain_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plot a job log's per-round metrics and timing (HTML, PNG); export them (CSV, JSON)",
        description=plain_text(__doc__.split("The work")[0].strip() if __doc__ else None),
    )
    p.add_argument(
        "log",
        type=Path,
        help="the job's event log (e.g. RUN_DIR/researcher/job.log) or its run directory",
    )
    p.add_argument(
        "--out",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="write the report to FILE: .html (self-contained page), .png (the figure), .csv "
        "or .json (one row per round and node); may be given more than once. Without it, "
        "print the run's summary and write nothing",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    for out in args.out:  # check every suffix before writing any
        if out.suffix.lower() not in report.OUTPUT_SUFFIXES:
            raise report.ReportError(
                f"{out}: the report is written as .html, .png, .csv or .json, "
                f"not {out.suffix.lower()!r}"
            )
    if not args.out:
        _log, data = report.load_data(args.log)
        print(report.format_header(data), end="")
        print("no file written: add --out report.html (or .png, .csv, .json)")
        return 0
    for out in args.out:
        written = report.write_report(args.log, out)
        print(f"report={written}")
    return 0
