"""``fedsm repo serve``: run the HTTP file repository in the foreground.

The first line on stdout is ``repository=<url>`` (flushed), so scripts and tests can start
the server on port 0 and read back where it listens. The server stops cleanly on SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path

from fedsm.cli.procs import signal_setter
from fedsm.errors import ConfigurationError

_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``"1048576"``, ``"512M"``, ``"2GiB"`` (binary units); ArgumentTypeError else."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2147483648, 512M, 2G)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedsm repo`` and its ``serve`` sub-command to the CLI."""
    p = sub.add_parser("repo", help="the file repository (content-addressed, HTTP)")
    repo_sub = p.add_subparsers(dest="repo_command", metavar="SUBCOMMAND", required=True)
    serve = repo_sub.add_parser(
        "serve",
        help="serve a repository directory over HTTP until SIGINT/SIGTERM",
        description="Serve DIR over HTTP. Prints 'repository=<url>' first, then runs until "
        "interrupted. Loopback only unless --host says otherwise; use a token off loopback.",
    )
    serve.add_argument(
        "--root", required=True, type=Path, metavar="DIR", help="the repository directory"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: a free port)")
    serve.add_argument(
        "--token",
        default=os.environ.get("FEDSM_REPO_TOKEN"),
        help="bearer token every request must carry (default: $FEDSM_REPO_TOKEN; none if unset)",
    )
    serve.add_argument(
        "--max-size",
        type=parse_size,
        default=2**31,
        metavar="BYTES",
        help="largest file accepted, e.g. 2147483648 or 2G (default 2 GiB)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        metavar="N",
        help="connections served at once, a thread each; more get a 503 (default 64)",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest wait for any one read or write on a connection (default 10)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a request's headers, and its body, must arrive within this (default 30), plus "
        "the body's size at --min-upload-rate",
    )
    serve.add_argument(
        "--min-upload-rate",
        type=parse_size,
        default=64 * 1024,
        metavar="BYTES",
        help="bytes per second an upload is given time for, e.g. 64K (default 64 KiB/s)",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from fedsm.repository.server import RepositoryServer

    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port {args.port} is not a TCP port (0-65535)")
    server = RepositoryServer(
        args.root,
        host=args.host,
        port=args.port,
        token=args.token,
        max_size=args.max_size,
        max_connections=args.max_connections,
        read_timeout_s=args.read_timeout,
        request_timeout_s=args.request_timeout,
        min_upload_rate=args.min_upload_rate,
    )
    stop = threading.Event()

    on_signal = signal_setter(stop)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        try:
            print(f"repository={server.url}", flush=True)
            if args.token is None and args.host not in ("127.0.0.1", "::1", "localhost"):
                print(f"fedsm: warning: serving on {args.host} without a token", file=sys.stderr)
            stop.wait()
        finally:
            server.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
