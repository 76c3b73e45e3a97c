"""Running a private mosquitto broker as a child process (demo with ``--mqtt``, tests, benchmarks).

The broker gets a config written here (loopback listener on a free port, ``set_tcp_nodelay``,
raised queue limits, persistence in the work directory) and is stopped by PID. It never
touches a system-wide broker: the port is always one we chose. Readiness is a bounded wait
for the listener to accept a TCP connection.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from fedsm.transport.base import TransportError

__all__ = [
    "MosquittoNotFound",
    "MosquittoProcess",
    "find_mosquitto",
    "dev_config",
    "free_port",
    "start_mosquitto",
]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
INSTALL_HINT = (
    "install mosquitto: `apt-get install mosquitto` (Debian/Ubuntu), `brew install mosquitto` "
    "(macOS), `conda install -c conda-forge mosquitto`, or run the eclipse-mosquitto Docker image"
)


class MosquittoNotFound(TransportError):
    """No mosquitto executable on this machine."""


def find_mosquitto() -> str:
    """The mosquitto executable, or raise :class:`MosquittoNotFound` saying how to get it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise MosquittoNotFound(f"mosquitto is not installed; {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dev_config(port: int, workdir: Path, *, host: str = "127.0.0.1", extra: str = "") -> str:
    """The development broker config: loopback, anonymous, NODELAY, big queues, persistence."""
    lines = [
        "# written by fedsm.transport.mosquitto: a private development broker",
        "per_listener_settings false",
        f"listener {port} {host}",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "max_inflight_messages 20",
        "max_packet_size 1048576",
        "persistence true",
        f"persistence_location {workdir}/",
        "autosave_interval 1",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if os.geteuid() == 0:
        # mosquitto started as root drops to user "mosquitto", which cannot write our workdir.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


class MosquittoProcess:
    """A mosquitto child process with a fixed config and port.

    Attributes ``host``, ``port``, ``pid``, ``config_path`` and ``log_path`` describe it;
    :meth:`stop` and :meth:`restart` act on it by PID only.
    """

    def __init__(
        self,
        config_text: str,
        workdir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        executable: str | None = None,
        ready_timeout_s: float = 10.0,
    ) -> None:
        self.host, self.port = host, port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / "mosquitto.log"
        self.executable = executable or find_mosquitto()
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def pid(self) -> int | None:
        """PID of the running broker, None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the broker and wait (bounded) until it accepts connections."""
        if self._proc is not None:
            raise TransportError(f"mosquitto on port {self.port} is already running")
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence DB), then SIGKILL after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        """Stop cleanly and start again on the same port with the same config and data."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """The broker's log so far (for error messages and tests)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        pause = threading.Event()
        delay = 0.005
        while True:
            code = self._proc.poll()
            if code is not None:
                raise TransportError(
                    f"mosquitto exited with code {code} at start; log {self.log_path}:\n"
                    + self.log_text()[-2000:]
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                # mosquitto opens listeners one by one and exits if a later one fails:
                # accept only if it is still alive after our probe.
                if self._proc.poll() is None:
                    return
                continue
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"mosquitto did not listen on {self.host}:{self.port} within "
                    f"{self.ready_timeout_s:g} s; log:\n" + self.log_text()[-2000:]
                )
            pause.wait(delay)  # bounded, growing pause between readiness probes
            delay = min(delay * 2, 0.1)

    def __enter__(self) -> MosquittoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    workdir: Path,
    *,
    port: int | None = None,
    config_extra: str = "",
    config: str | None = None,
    host: str = "127.0.0.1",
    executable: str | None = None,
    ready_timeout_s: float = 10.0,
) -> MosquittoProcess:
    """Start a private broker in ``workdir`` on ``port`` (a free one by default).

    ``config`` replaces the development config entirely (it must then listen on ``port``,
    which is required in that case); otherwise :func:`dev_config` plus ``config_extra``.
    """
    if config is not None and port is None:
        raise ValueError("a custom config needs the port it listens on")
    port = port if port is not None else free_port(host)
    text = (
        config
        if config is not None
        else dev_config(port, Path(workdir), host=host, extra=config_extra)
    )
    return MosquittoProcess(
        text, Path(workdir), port, host=host, executable=executable, ready_timeout_s=ready_timeout_s
    )
