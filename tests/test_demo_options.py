"""``fedsm demo``'s options and its first hour: bad values refused up front, flags over the
stored settings, progress and Ctrl-C, a token on the repository server, a run of its own on
a shared broker."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from broker_fixture import mosquitto  # noqa: F401

from fedsm.cli import main as cli_main
from fedsm.cli.demo.run import DemoConfig, _load_or_store_config, _warn_small_shares
from fedsm.errors import ConfigurationError


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["demo", *argv])
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--nodes", "0", "--nodes"),
        ("--nodes", "-2", "--nodes"),
        ("--rounds", "0", "--rounds"),
        ("--reply-deadline", "0", "--reply-deadline"),
        ("--reply-deadline", "-5", "--reply-deadline"),
        ("--reply-deadline", "nan", "--reply-deadline"),
        ("--broker", "127.0.0.1:1883", "mqtt://"),
    ],
)
def test_bad_values_are_refused_up_front(tmp_path: Path, flag: str, value: str, named: str):
    run_dir = tmp_path / "run"
    code, err = _cli("--run-dir", str(run_dir), flag, value)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedsm: error: ") and named in err
    assert "Traceback" not in err
    assert not run_dir.exists()  # nothing created


def test_flags_override_the_stored_settings(tmp_path: Path) -> None:
    stored = DemoConfig(nodes=3, rounds=2, transport="mqtt", broker="mqtt://127.0.0.1:18")
    assert _load_or_store_config(tmp_path, stored) == stored
    # A --broker typo does not brick the directory: the new broker replaces the stored one.
    fixed = DemoConfig(broker="mqtt://127.0.0.1:1883")
    config = _load_or_store_config(tmp_path, fixed, {"broker"})
    assert config.broker == "mqtt://127.0.0.1:1883"
    assert (config.nodes, config.rounds, config.transport) == (3, 2, "mqtt")  # kept
    assert json.loads((tmp_path / "demo.json").read_text())["broker"] == config.broker
    # No flag given: the stored settings.
    assert _load_or_store_config(tmp_path, DemoConfig(), set()) == config
    # The job has no record yet: its settings may still change (the data is split again).
    (tmp_path / "data").mkdir()
    config = _load_or_store_config(tmp_path, DemoConfig(nodes=2), {"nodes"})
    assert config.nodes == 2 and not (tmp_path / "data").exists()


def test_job_settings_of_a_started_run_are_refused(tmp_path: Path) -> None:
    from fedsm.cli.demo.run import run_demo

    run_demo(tmp_path, DemoConfig(nodes=2, rounds=1, seed=3), say=lambda s: None)
    stored = (tmp_path / "demo.json").read_bytes()
    with pytest.raises(ConfigurationError, match=r"--rounds 4 \(the run has 1\)"):
        _load_or_store_config(tmp_path, DemoConfig(rounds=4, seed=3), {"rounds", "seed"})
    code, err = _cli("--run-dir", str(tmp_path), "--label-skew", "--seed", "3")
    assert code == 2 and err.count("\n") == 1
    assert "--iid/--label-skew false (the run has true)" in err and "--seed" not in err
    assert (tmp_path / "demo.json").read_bytes() == stored  # unchanged
    # Settings that do not define the job are replaced, even on a finished run.
    code, err = _cli("--run-dir", str(tmp_path), "--reply-deadline", "5")
    assert code == 0, err
    assert json.loads((tmp_path / "demo.json").read_text())["reply_deadline_s"] == 5.0


def test_small_node_shares_are_warned_about(tmp_path: Path) -> None:
    big, small = tmp_path / "a.csv", tmp_path / "b.csv"
    big.write_text("x,target\n" + "1,0\n" * 50)
    small.write_text("x,target\n" + "1,0\n" * 6)
    said: list[str] = []
    _warn_small_shares([big, big], said.append)
    assert said == []
    _warn_small_shares([big, small], said.append)
    assert len(said) == 1 and "6 rows" in said[0] and "--nodes" in said[0]


# --------------------------------------------------------------------------- over MQTT


def _demo(run_dir: Path, broker: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsm", "demo", "--run-dir", str(run_dir)]
        + ["--transport", "mqtt", "--broker", broker, "--seed", "7", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its process group, by PID
    proc.wait(30)


def _processes_under(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.mqtt
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path, mosquitto) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    proc = _demo(run_dir, mosquitto.url, "--nodes", "3", "--rounds", "3")
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("round 1/"):
                break
        assert [x for x in lines if "nodes online" in x] == [
            f"{k}/3 nodes online" for k in (1, 2, 3)
        ]
        # The repository server wants the run's token, kept private in mqtt.json.
        settings_path = run_dir / "mqtt.json"
        assert settings_path.stat().st_mode & 0o777 == 0o600
        settings = json.loads(settings_path.read_text())
        assert settings["topic_prefix"].startswith("fedsm/demo-")
        url = f"http://127.0.0.1:{settings['repository_port']}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        assert all(
            settings["repository_token"] not in open(f"/proc/{pid}/cmdline").read()
            for pid in _processes_under(run_dir)
        )
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        _, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 130, err
    assert f"resume with: fedsm demo --run-dir {run_dir.resolve()}" in err
    assert "Traceback" not in err and "WORKER_CRASHED" not in err and "crash" not in err, err
    assert _processes_under(run_dir) == []  # every node and the server stopped
    resumed = subprocess.run(
        [sys.executable, "-m", "fedsm", "demo", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout


@pytest.mark.mqtt
def test_two_demos_share_one_broker(tmp_path: Path, mosquitto) -> None:  # noqa: F811
    from fedsm.cli.demo.run import run_demo

    memory = run_demo(tmp_path / "memory", DemoConfig(nodes=2, rounds=2, seed=7), say=print)
    procs = [
        _demo(tmp_path / name, mosquitto.url, "--nodes", "2", "--rounds", "2")
        for name in ("a", "b")
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert f"final_params_sha256={memory.final_params_sha256}" in out
