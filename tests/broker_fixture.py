"""Pytest fixtures that run a private mosquitto broker on a free loopback port.

MQTT tests are never skipped: if mosquitto is missing, :func:`ensure_mosquitto` installs it
from Debian's packages, and if that fails the test fails with the reason. The system may run
its own mosquitto on 1883; these brokers never use that port and are stopped by PID.

Use from a test module with ``from broker_fixture import mosquitto  # noqa: F401``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsm.transport.mosquitto import MosquittoNotFound, MosquittoProcess, find_mosquitto
from fedsm.transport.mosquitto import start_mosquitto as _start

__all__ = ["Broker", "ensure_mosquitto", "start_mosquitto", "mosquitto", "mosquitto_session"]

#: The handle tests get: ``host``, ``port``, ``pid``, ``stop()``, ``restart()``, ``kill()``.
Broker = MosquittoProcess


def ensure_mosquitto() -> str:
    """The mosquitto executable; install it with apt-get if missing, else fail the test."""
    try:
        return find_mosquitto()
    except MosquittoNotFound:
        pass
    errors = []
    for cmd in (
        ["apt-get", "install", "-y", "mosquitto"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "mosquitto"],
    ):
        if shutil.which(cmd[0]) is None:
            errors.append(f"{cmd[0]} not found")
            break
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            errors.append(f"{' '.join(cmd)} -> {done.returncode}: {done.stderr[-500:]}")
        elif cmd[1] == "install":
            break
    try:
        return find_mosquitto()
    except MosquittoNotFound:
        pytest.fail(
            "mosquitto is required for the MQTT tests and could not be installed:\n"
            + "\n".join(errors),
            pytrace=False,
        )


def start_mosquitto(
    tmp_path: Path, *, config_extra: str = "", port: int | None = None, config: str | None = None
) -> Broker:
    """Start a broker with the development config (plus ``config_extra``) in ``tmp_path``.

    ``config`` replaces the whole config (then ``port`` is required). The caller stops it.
    """
    executable = ensure_mosquitto()
    return _start(
        Path(tmp_path), port=port, config_extra=config_extra, config=config, executable=executable
    )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker per test (needed by tests that restart or inspect it)."""
    broker = start_mosquitto(tmp_path / "broker")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker shared by tests that only exchange messages (use unique participant ids)."""
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"))
    try:
        yield broker
    finally:
        broker.stop()
