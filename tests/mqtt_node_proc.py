"""A node process for the MQTT tests: connects, answers pings, and waits to be stopped or killed.

Run as ``python mqtt_node_proc.py --port P --node ID``. Prints ``READY`` once connected. It
exits cleanly (announcing "offline") when its stdin closes or after ``--lifetime`` seconds,
so it never outlives a test; the SIGKILL test kills it before that.
"""

from __future__ import annotations

import argparse
import sys
import threading

from fedsm.core.messages import Message, PingReply, PingRequest
from fedsm.transport import MqttBus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--prefix", default="fedsm")
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()

    bus = MqttBus(
        args.node,
        "node",
        host=args.host,
        port=args.port,
        connect_timeout_s=10,
        topic_prefix=args.prefix,
    )

    def answer(message: Message) -> None:
        if isinstance(message, PingRequest):
            bus.reply(
                PingReply(
                    request_id=message.request_id,
                    researcher_id=message.researcher_id,
                    node_id=args.node,
                )
            )

    bus.subscribe(answer)
    print("READY", flush=True)
    stdin_closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stdin_closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stdin_closed.wait(args.lifetime)
    bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
