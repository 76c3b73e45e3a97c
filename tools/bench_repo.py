"""Benchmark: repository throughput against a plain file copy, measured in the same run.

Starts ``fedsm repo serve`` as a subprocess on 127.0.0.1, then times (best of ``--repeats``)
for one file of ``--size-mib`` MiB:

* ``shutil.copyfile`` (the baseline) and ``copyfile`` + fsync (what a durable copy costs);
* ``LocalRepository`` upload and download;
* ``HttpRepository`` upload (hash once, HEAD, streamed PUT; the server hashes, fsyncs and
  renames) and download (streamed GET, hashed, fsynced, renamed).

Each repeat uploads different bytes, so the HEAD probe never short-cuts an upload. MB/s are
10^6 bytes per second; ratios are against ``shutil.copyfile`` in the same run, so they are
comparable across machines where absolute numbers are not.

Usage: ``.venv/bin/python tools/bench_repo.py [--size-mib 200] [--repeats 3] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedsm.repository import HttpRepository, LocalRepository


def _write_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])


def _make_unique(path: Path, tag: int) -> None:
    """Change the first bytes so each repeat uploads new content (a new digest)."""
    with open(path, "r+b") as f:
        f.write(tag.to_bytes(8, "big") + b"fedsm-bench")


def _best(repeats: int, prepare: Callable[[int], None], run: Callable[[int], None]) -> float:
    times = []
    for i in range(repeats):
        prepare(i)
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return min(times)


def _copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _start_server(root: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsm", "repo", "serve", "--root", str(root), "--token", "bench"],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("repository="):
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"fedsm repo serve did not start (first line {line!r})")
    return proc, line.strip().split("=", 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: tmp)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_repo_", dir=args.dir))
    size = args.size_mib << 20
    src = work / "src.bin"
    _write_file(src, args.size_mib)
    proc, url = _start_server(work / "http-store")
    try:
        local = LocalRepository(work / "local-store")
        remote = HttpRepository(url, "bench", timeout_s=120)
        urls: dict[str, str] = {}

        def unique(i: int) -> None:
            _make_unique(src, i + 1)

        def no_prep(i: int) -> None:
            pass

        def local_up(i: int) -> None:
            urls["local"] = local.upload_file(src)["file"]

        def http_up(i: int) -> None:
            urls["http"] = remote.upload_file(src)["file"]

        results = {
            "shutil.copyfile": _best(
                args.repeats, no_prep, lambda i: shutil.copyfile(src, work / f"copy{i}")
            ),
            "copyfile + fsync": _best(
                args.repeats, no_prep, lambda i: _copy_fsync(src, work / f"copyf{i}")
            ),
            "LocalRepository upload": _best(args.repeats, unique, local_up),
            "LocalRepository download": _best(
                args.repeats, no_prep, lambda i: local.download_file(urls["local"], work / "l.out")
            ),
            "HTTP upload (PUT)": _best(args.repeats, unique, http_up),
            "HTTP download (GET)": _best(
                args.repeats, no_prep, lambda i: remote.download_file(urls["http"], work / "h.out")
            ),
        }
        remote.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        shutil.rmtree(work, ignore_errors=True)

    base = size / results["shutil.copyfile"]
    print(f"file: {args.size_mib} MiB, best of {args.repeats}, server on 127.0.0.1 (subprocess)")
    print(f"{'operation':<28}{'MB/s':>10}{'vs copyfile':>14}")
    for name, seconds in results.items():
        rate = size / seconds
        print(f"{name:<28}{rate / 1e6:>10.0f}{rate / base:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
