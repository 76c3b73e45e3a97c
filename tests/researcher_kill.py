"""Run the demo in this process and SIGKILL it right after the N-th event of one type.

Used by tests/test_job_restore.py and tests/test_demo.py:
``python researcher_kill.py RUN_DIR EVENT N ROUNDS NODES [BROKER_URL]`` (with a broker URL the
demo runs over MQTT, with its repository server and node processes).
The kill happens after the event is appended (and made durable), which is the worst case
for a restore: the log knows something that nothing after it has acted on.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.log import writer as fedsm_log


def main() -> None:
    run_dir, event_type, nth, rounds, nodes, *broker = sys.argv[1:]
    original = fedsm_log.EventLog.append
    seen = 0

    def append(self, event, *, ts):  # type: ignore[no-untyped-def]
        nonlocal seen
        seq = original(self, event, ts=ts)
        if type(event).__name__ == event_type:
            seen += 1
            if seen == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return seq

    fedsm_log.EventLog.append = append  # type: ignore[method-assign]
    transport = {"transport": "mqtt", "broker": broker[0]} if broker else {}
    config = DemoConfig(nodes=int(nodes), rounds=int(rounds), seed=0, **transport)
    run_demo(Path(run_dir), config, say=lambda line: None)
    raise SystemExit(f"the run finished without a {nth}th {event_type} event")


if __name__ == "__main__":
    main()
