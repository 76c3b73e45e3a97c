"""``fedsm check``: conformance probes of live participants.

``check node`` probes a running node over MQTT with requests that change nothing and with
malformed or foreign ones (see :mod:`fedsm.testing.probe`), and prints one line per property.
Exit status: 0 when every property passes, 1 when one fails (2: the probe could not run, e.g.
the broker is unreachable).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``check`` command and its sub-commands to the ``fedsm`` parser."""
    check = sub.add_parser("check", help="conformance probes of live participants")
    cmds = check.add_subparsers(dest="check_command", metavar="TARGET", required=True)
    p = cmds.add_parser(
        "node",
        help="probe a running node over MQTT (changes nothing on it)",
        description="Send a live node requests that change nothing (ping, list, search, the "
        "status of an unknown plan) and malformed or foreign ones, and check each answer. "
        "Never sends a train request. Exit 0 if every property passes, 1 otherwise.",
    )
    p.add_argument("--broker", required=True, help="mqtt://[user[:pass]@]host:port[?prefix=P]")
    p.add_argument("--node", required=True, dest="node_id", help="the node id to probe")
    p.add_argument(
        "--token",
        help="the probe's broker password (username: the URL's, else the probe's researcher id)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait for each answer, and for silence after a malformed request "
        "(default: 5)",
    )
    p.add_argument("--researcher", metavar="ID", help="the probe's researcher id (default: random)")
    p.add_argument("--json", action="store_true", help="print [{property, ok, exchange}, ...]")
    p.set_defaults(func=_check_node)


def _check_node(args: argparse.Namespace) -> int:
    from fedsm.testing.probe import format_results, probe_node

    results = probe_node(
        args.broker,
        args.node_id,
        token=args.token,
        timeout_s=args.timeout,
        researcher_id=args.researcher,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_results(results))
    return 0 if all(r.ok for r in results) else 1
