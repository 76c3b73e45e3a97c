"""Replay, inspect or audit a job's event log: the same as ``fedsm replay`` (fedsm.audit.replay).

Usage: python tools/replay.py LOG_OR_RUN_DIR [--at SEQ | --round N | --verify
       [--repo URL_OR_DIR] [--token T] [--witness FILE ...] [--witness-key NODE=HEX]]
       [--expect-head SEQ:HASH] [--json]
"""

from __future__ import annotations

import sys

from fedsm.audit.replay import main

if __name__ == "__main__":
    sys.exit(main())
