"""Benchmark the event log: append rates per durability, raw fsync rate, and replay.

Events are mostly ``ReplyReceived`` records (a full job's mix: one RoundSent and one
Aggregated per round of N replies) of about 280 bytes, 315 on average with the round events:
as small as this record format gets for a reply (the 64-character sha256, the 32-byte
``prev`` and the field names alone are ~190 bytes), so the issue's "about 200 bytes" is
approached but not reached. Replay is what restoring a job costs: open the file,
check every frame and the hash chain, decode every event and fold it through
``fedsm.core.lifecycle.apply``.

Usage: python tools/bench_log.py [--events N] [--fsync-events N] [--dir DIR]

Prints a table, then one line of ``key=value`` figures (events or fsyncs per second).
Timings vary from run to run and machine to machine; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedsm.core import events as ev
from fedsm.core.lifecycle import replay
from fedsm.log.read import gc_paused, scan
from fedsm.log.writer import EventLog


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def job_events(total: int, nodes: int = 10) -> Iterator[ev.Event]:
    """A legal job of about ``total`` events: rounds of ``nodes`` replies.

    Ids are short (``n03``, ``r12-n03``) and a reply carries one metric, so a ``ReplyReceived``
    record is about as small as this format allows (the sha256 hex digest, the 32-byte
    ``prev`` and the field names are most of it).
    """
    names = tuple(f"n{i:02d}" for i in range(nodes))
    rounds = max(1, total // (nodes + 2))
    plan, params = _sha("plan"), _sha("p0")
    yield ev.JobCreated(
        "job-bench", "researcher", "BenchPlan", {"epochs": 1}, {}, 7, names,
        {n: f"ds-{n}" for n in names}, rounds, 1, 60.0, "fedavg", {}, (),
    )  # fmt: skip
    yield _event(ev.TrainingPlanUploaded, url="http://r/plan", sha256=plan, class_name="BenchPlan")
    yield _event(ev.ParamsUploaded, round=0, url="http://r/p0", sha256=params)
    yield ev.ApprovalChecked(plan, {n: "approved" for n in names}, {n: True for n in names})
    for r in range(1, rounds + 1):
        rids = {n: f"r{r}-{n}" for n in names}
        yield _event(
            ev.RoundSent, round=r, nodes=names, request_ids=rids, params_url=f"http://r/p{r - 1}",
            params_sha256=params, deadline=1.7e9 + r, aggregator_args={},
        )  # fmt: skip
        for n in names:
            yield _event(
                ev.ReplyReceived, round=r, node_id=n, request_id=rids[n],
                params_url=f"http://r/{r}/{n}", params_sha256=_sha(f"{r}{n}"), sample_size=1000,
                metrics={"loss": 0.25}, timing={},
            )  # fmt: skip
        params = _sha(f"agg{r}")
        yield _event(
            ev.Aggregated, round=r, params_url=f"http://r/a{r}", params_sha256=params,
            nodes=names, weights=dict.fromkeys(names, 1.0), aggregator="fedavg",
        )  # fmt: skip
    yield _event(
        ev.JobCompleted, round=rounds, params_url=f"http://r/a{rounds}", params_sha256=params
    )


def _event(cls: type[ev.Event], **fields: object) -> ev.Event:
    """``cls`` built from those of ``fields`` it has: the benchmark runs across event schema
    versions (URLs left the events in version 2; RoundSent gained ``aggregator_args``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


def bench_append(directory: Path, events: list[ev.Event], durability: str) -> float:
    path = directory / f"append-{durability}.log"
    start = time.perf_counter()
    with EventLog.open(path, durability=durability) as log:
        for i, event in enumerate(events):
            log.append(event, ts=1.7e9 + i)
    return len(events) / (time.perf_counter() - start)


def bench_raw_fsync(directory: Path, count: int) -> float:
    """Write 200 bytes and fdatasync, ``count`` times: the disk's own limit."""
    path = directory / "raw-fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sync = getattr(os, "fdatasync", os.fsync)
    block = b"x" * 200
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, block)
            sync(fd)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def bench_replay(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    view = scan(path)
    with gc_paused():  # as Job.restore folds: the core leaves the collector to the shell
        state = replay(r.event for r in view.records)
    elapsed = time.perf_counter() - start
    assert state.status == "completed", state.status
    return len(view.records) / elapsed, len(view.records)


def bench_restore(directory: Path, rounds: int = 1000, nodes: int = 3) -> tuple[float, int]:
    """Seconds to restore a job as ``Job.restore`` does (open as writer, read, fold), for a
    log of ``rounds`` rounds of ``nodes`` replies; best of five."""
    path = directory / "restore.log"
    with EventLog.open(path, durability="never") as log:
        for event in job_events(rounds * (nodes + 2), nodes=nodes):
            log.append(event, ts=0.0)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        with EventLog.open(path) as log, gc_paused():
            state = replay(log.events())
        best = min(best, time.perf_counter() - start)
    assert state.status == "completed" and state.round == rounds, (state.status, state.round)
    return best, log.last_seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--fsync-events", type=int, default=2_000, help="events for fsync runs")
    parser.add_argument("--nodes", type=int, default=10, help="nodes per round")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()

    events = list(job_events(args.events, nodes=args.nodes))
    slow = list(job_events(args.fsync_events, nodes=args.nodes))
    # The prepared events are the harness, not the log: keep the collector from scanning
    # them again and again (a live job does not hold 200k events in memory).
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fedsm-bench-") as tmp:
        directory = Path(tmp)
        never = bench_append(directory, events, "never")
        size = (directory / "append-never.log").stat().st_size
        sizes = [size // len(events)]
        batch = bench_append(directory, events, "batch")
        process = bench_append(directory, events[: len(events) // 4], "process")
        always = bench_append(directory, slow, "always")
        raw = bench_raw_fsync(directory, len(slow))
        counts = len(events), len(slow)
        # Replay runs as restoring a job does, in a process that holds no prepared events:
        # drop them and unfreeze, so the log reader hands its records to the old generation
        # as it does when nothing else froze objects (see fedsm.log.read.gc_paused).
        del events, slow
        gc.unfreeze()
        gc.collect()
        replay_rate, replayed = bench_replay(directory / "append-never.log")
        restore_s, restore_records = bench_restore(directory)

    rows = [
        ("append, durability=never", never, f"{counts[0]} events"),
        ("append, durability=batch (64 ev / 10 ms)", batch, f"{counts[0]} events"),
        ("append, durability=process (write each)", process, f"{counts[0] // 4} events"),
        ("append, durability=always (fdatasync each)", always, f"{counts[1]} events"),
        ("raw write(200 B) + fdatasync", raw, f"{counts[1]} writes"),
        ("replay: open+check+decode+apply", replay_rate, f"{replayed} events"),
    ]
    print(f"events of about {sizes[0]} bytes on disk (frame + msgpack payload)")
    print(f"{'measure':<46} {'per second':>12}  {'run':>16}")
    for name, rate, run in rows:
        print(f"{name:<46} {rate:>12,.0f}  {run:>16}")
    print(f"always / raw fsync = {always / raw:.2f}")
    print(
        f"restore of a 1,000-round 3-node job ({restore_records} records, Job.restore's path): "
        f"{restore_s:.3f} s"
    )
    print(
        f"append_never_per_s={never:.0f} append_batch_per_s={batch:.0f} "
        f"append_process_per_s={process:.0f} "
        f"append_always_per_s={always:.0f} raw_fsync_per_s={raw:.0f} replay_per_s={replay_rate:.0f}"
    )


if __name__ == "__main__":
    main()
