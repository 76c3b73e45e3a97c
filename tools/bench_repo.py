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

With ``--hostile`` it measures instead what attackers do to the same server: the threads
the server process holds while ``--slow-connections`` (300) connections send half a request
and stop, whether a normal request gets through meanwhile, and how long a connection that
sends its body (or its headers) one byte every 2 s keeps its thread (given up after
``--slow-limit-s`` seconds).

Usage: ``.venv/bin/python tools/bench_repo.py [--size-mib 200] [--repeats 3] [--dir DIR]``
or ``.venv/bin/python tools/bench_repo.py --hostile [--slow-connections 300]``
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from fedsm.repository import HttpRepository, LocalRepository

_TOKEN = "bench"


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
        [sys.executable, "-m", "fedsm", "repo", "serve", "--root", str(root), "--token", _TOKEN],
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


def _stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


def _head_status(host: str, port: int) -> tuple[str, float]:
    """One HEAD on a new connection: (status line or error, seconds)."""
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(
                f"HEAD /files/{'0' * 64} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {_TOKEN}\r\nConnection: close\r\n\r\n".encode()
            )
            line = sock.recv(4096).split(b"\r\n", 1)[0].decode("latin-1") or "closed"
    except OSError as exc:
        line = type(exc).__name__
    return line, time.perf_counter() - start


def _dribble(host: str, port: int, head: bytes, tail: bytes, limit_s: float) -> float | None:
    """Send ``head``, then ``tail`` one byte every 2 s; seconds until the server closes.

    None if the connection is still open after ``limit_s`` seconds (or ``tail`` ran out).
    """
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head)
        for i in range(len(tail)):  # bounded by the tail and by limit_s
            if time.perf_counter() - start > limit_s:
                return None
            try:
                sock.sendall(tail[i : i + 1])
            except OSError:
                return time.perf_counter() - start
            ready, _, _ = select.select([sock], [], [], 2.0)
            if ready:
                try:
                    while sock.recv(4096):  # an answer (408) first, then the close
                        pass
                except OSError:
                    pass
                return time.perf_counter() - start
    return None


def hostile(args: argparse.Namespace) -> int:
    """Slow connections and slow requests against ``fedsm repo serve``; print the numbers."""
    work = Path(tempfile.mkdtemp(prefix="bench_repo_hostile_", dir=args.dir))
    proc, url = _start_server(work / "store")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        server = psutil.Process(proc.pid)
        idle_threads = server.num_threads()
        socks: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(args.slow_connections):
                try:
                    sock = socket.create_connection((host, port), timeout=10)
                except OSError:
                    refused += 1
                    continue
                socks.append(sock)
                try:
                    sock.sendall(f"PUT /files/{'a' * 64} HTTP/1.1\r\nHost: x\r\n".encode())
                except OSError:
                    refused += 1
            peak = 0
            for _ in range(20):  # 2 s of samples
                peak = max(peak, server.num_threads())
                time.sleep(0.1)
            during = _head_status(host, port)
        finally:
            for sock in socks:
                sock.close()
        time.sleep(1.0)
        after = _head_status(host, port)
        results: dict[str, float | None] = {}
        body = (
            f"PUT /files/{'b' * 64} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {_TOKEN}\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        headers = f"PUT /files/{'c' * 64} HTTP/1.1\r\nHost: x\r\n".encode()
        runs = {
            "slow body (1 B / 2 s)": (body, b"x" * 1000),
            "slow headers (1 B / 2 s)": (headers, b"X-Slow: " + b"y" * 1000),
        }
        threads = [
            threading.Thread(
                target=lambda name, h, t: results.__setitem__(
                    name, _dribble(host, port, h, t, args.slow_limit_s)
                ),
                args=(name, h, t),
            )
            for name, (h, t) in runs.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.slow_limit_s + 30)
    finally:
        _stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)

    print(f"fedsm repo serve on 127.0.0.1 (subprocess), {args.slow_connections} slow connections")
    print(f"server threads idle: {idle_threads}, peak while held: {peak}")
    print(f"connections refused at connect or first send: {refused}")
    print(f"normal HEAD while held: {during[0]!r} in {during[1]:.3f} s")
    print(f"normal HEAD after they close: {after[0]!r} in {after[1]:.3f} s")
    for name, seconds in results.items():
        held = (
            f"dropped after {seconds:.1f} s"
            if seconds is not None
            else (f"still open after {args.slow_limit_s:.0f} s")
        )
        print(f"{name}: {held}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: tmp)")
    parser.add_argument("--hostile", action="store_true", help="measure attacks, not speed")
    parser.add_argument("--slow-connections", type=int, default=300)
    parser.add_argument("--slow-limit-s", type=float, default=90.0)
    args = parser.parse_args()
    if args.hostile:
        return hostile(args)

    work = Path(tempfile.mkdtemp(prefix="bench_repo_", dir=args.dir))
    size = args.size_mib << 20
    src = work / "src.bin"
    _write_file(src, args.size_mib)
    proc, url = _start_server(work / "http-store")
    try:
        local = LocalRepository(work / "local-store")
        remote = HttpRepository(url, _TOKEN, timeout_s=120)
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
        _stop_server(proc)
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
