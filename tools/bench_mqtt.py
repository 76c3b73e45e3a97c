"""Request-reply latency of the buses: MqttBus over a private mosquitto, and MemoryBus.

Starts its own mosquitto on a free loopback port (never the system's), runs a node in a child
process that answers pings, and times ping -> pong round trips from a researcher MqttBus:

* with TCP_NODELAY on broker and clients (what fedsm ships);
* with Nagle left on everywhere (what paho and mosquitto do by default), fewer exchanges;
* the in-process MemoryBus, for reference.

Every loop is bounded by a count and a time limit. Prints median, p90, p99 in milliseconds.

    python tools/bench_mqtt.py [--count 1000] [--warmup 50] [--slow-count 40] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedsm.core.messages import Message, PingReply, PingRequest
from fedsm.transport import MemoryBroker, MemoryBus, MqttBus
from fedsm.transport.mosquitto import dev_config, free_port, start_mosquitto

RESEARCHER = "bench-researcher"
NODE = "bench-node"


def run_node(port: int, nodelay: bool) -> int:
    """Child process: answer pings until stdin closes."""
    bus = MqttBus(NODE, "node", port=port, tcp_nodelay=nodelay, topic_prefix="bench")
    bus.subscribe(
        lambda m: bus.reply(
            PingReply(request_id=m.request_id, researcher_id=m.researcher_id, node_id=NODE)
        )
    )
    print("READY", flush=True)
    sys.stdin.read()
    bus.close()
    return 0


class Waiter:
    """Lets the timing loop wait for the reply to one request id."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: set[str] = set()

    def __call__(self, message: Message) -> None:
        with self.cond:
            self.got.add(message.request_id)
            self.cond.notify_all()

    def wait(self, request_id: str, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: request_id in self.got, timeout_s)


def time_exchanges(
    bus, send, waiter: Waiter | None, count: int, warmup: int, time_limit_s: float
) -> list[float]:
    """Round trips in ms (warm-up discarded); stops at ``count`` or ``time_limit_s``."""
    samples: list[float] = []
    stop_at = time.monotonic() + time_limit_s
    for i in range(warmup + count):
        if time.monotonic() > stop_at:
            break
        request_id = f"b{i}"
        request = PingRequest(
            request_id=request_id, researcher_id=RESEARCHER, node_id=NODE, deadline=time.time() + 60
        )
        started = time.perf_counter()
        send(request)
        if waiter is not None and not waiter.wait(request_id, 5.0):
            raise RuntimeError(f"no reply to {request_id} within 5 s")
        elapsed = (time.perf_counter() - started) * 1000
        if i >= warmup:
            samples.append(elapsed)
    return samples


def report(label: str, samples: list[float]) -> None:
    if not samples:
        print(f"{label:<42} no samples")
        return
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    print(
        f"{label:<42} n={len(samples):<5} median={statistics.median(samples):8.3f} ms  "
        f"p90={pct(0.90):8.3f} ms  p99={pct(0.99):8.3f} ms"
    )


def bench_mqtt(workdir: Path, nodelay: bool, count: int, warmup: int, limit: float) -> list[float]:
    port = free_port()
    config = dev_config(port, workdir)
    if not nodelay:
        config = config.replace("set_tcp_nodelay true\n", "")
    broker = start_mosquitto(workdir, port=port, config=config)
    node = None
    researcher = None
    try:
        node = subprocess.Popen(
            [sys.executable, __file__, "--node", str(port)] + ([] if nodelay else ["--nagle"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        researcher = MqttBus(
            RESEARCHER, "researcher", port=port, tcp_nodelay=nodelay, topic_prefix="bench"
        )
        waiter = Waiter()
        researcher.subscribe(waiter)
        researcher.wait_online([NODE], timeout_s=20)
        return time_exchanges(
            researcher, lambda r: researcher.send(NODE, r), waiter, count, warmup, limit
        )
    finally:
        if researcher is not None:
            researcher.close()
        if node is not None:
            node.stdin.close()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(10)
        broker.stop()


def bench_memory(count: int, warmup: int, limit: float) -> list[float]:
    with MemoryBroker() as broker:
        researcher = MemoryBus(broker, RESEARCHER, "researcher")
        node = MemoryBus(broker, NODE, "node")
        node.subscribe(
            lambda m: node.reply(
                PingReply(request_id=m.request_id, researcher_id=m.researcher_id, node_id=NODE)
            )
        )
        replies: list[str] = []
        researcher.subscribe(lambda m: replies.append(m.request_id))
        samples = time_exchanges(
            researcher, lambda r: researcher.send(NODE, r), None, count, warmup, limit
        )
        if len(replies) != len(samples) + warmup:
            raise RuntimeError(f"memory bus lost replies: {len(replies)}")
        return samples


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--slow-count",
        type=int,
        default=40,
        help="exchanges without NODELAY (each takes ~40-90 ms)",
    )
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per scenario")
    parser.add_argument("--node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nagle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node is not None:
        return run_node(args.node, nodelay=not args.nagle)

    print("request -> reply round trip, QoS 1, researcher and node in separate processes")
    with tempfile.TemporaryDirectory() as tmp:
        fast = bench_mqtt(Path(tmp) / "nodelay", True, args.count, args.warmup, args.time_limit)
        report("MqttBus, TCP_NODELAY broker+clients", fast)
        slow = bench_mqtt(Path(tmp) / "nagle", False, args.slow_count, 5, args.time_limit)
        report("MqttBus, Nagle on (paho/mosquitto default)", slow)
    memory = bench_memory(args.count * 10, args.warmup, args.time_limit)
    report("MemoryBus (same thread, encode+decode)", memory)
    if fast and slow:
        ratio = statistics.median(slow) / statistics.median(fast)
        print(f"NODELAY speed-up (median, same run): {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
