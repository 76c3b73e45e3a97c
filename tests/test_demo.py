"""The main job end to end: over the memory bus, and over the real parts (a mosquitto broker
started here, `fedsm repo serve`, three `fedsm node start` processes) with identical results."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from broker_fixture import mosquitto  # noqa: F401

from fedsm.cli.demo.run import DemoConfig, run_demo

ROUNDS = 4


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("memory")
    lines: list[str] = []
    result = run_demo(run_dir, DemoConfig(nodes=3, rounds=ROUNDS, seed=7), say=lines.append)
    return run_dir, result, lines


def test_memory_bus_run_matches_the_centralised_baseline(memory_run) -> None:
    _run_dir, result, lines = memory_run
    assert result.federated_accuracy >= 0.9
    assert abs(result.federated_accuracy - result.local_accuracy) <= 0.02
    assert [line.split(":")[0] for line in lines] == [
        *(f"round {r}/{ROUNDS}" for r in range(1, ROUNDS + 1)),
        f"final validation (round {ROUNDS + 1})",  # the demo's args test on global updates
    ]


def test_a_finished_run_prints_its_results_again_without_training(memory_run) -> None:
    run_dir, result, _ = memory_run
    log_size = Path(result.log).stat().st_size
    out = subprocess.run(
        [sys.executable, "-m", "fedsm", "demo", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-5:] == result.lines()
    assert "finished run" in out.stdout
    assert Path(result.log).stat().st_size == log_size  # nothing appended


@pytest.mark.mqtt
def test_mqtt_run_gives_the_same_final_parameters(memory_run, tmp_path: Path, mosquitto) -> None:  # noqa: F811
    _, memory_result, _ = memory_run
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsm",
            "demo",
            "--run-dir",
            str(tmp_path),
            "--nodes",
            "3",
            "--rounds",
            str(ROUNDS),
            "--seed",
            "7",
            "--transport",
            "mqtt",
            "--broker",
            mosquitto.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines["final_params_sha256"] == memory_result.final_params_sha256
    assert lines["repository"] == str(tmp_path.resolve() / "repository")
    stored = {p.name for p in Path(lines["repository"]).rglob("*") if len(p.name) == 64}
    assert memory_result.final_params_sha256 in stored
    verify = subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", lines["log"], "--verify"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout


@pytest.mark.mqtt
def test_mqtt_run_killed_mid_round_resumes_to_the_same_parameters(
    tmp_path: Path,
    mosquitto,  # noqa: F811
) -> None:
    """The researcher is killed with SIGKILL while collecting round 2 over MQTT; its node and
    repository processes go with it; a resume starts them again and ends bit-identical to an
    uninterrupted memory-bus run of the same seed."""
    clean = run_demo(tmp_path / "clean", DemoConfig(nodes=3, rounds=3, seed=0), say=lambda s: None)
    killed = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "researcher_kill.py"),
            str(tmp_path / "m"),
            "ReplyReceived",
            "4",
            "3",
            "3",
            mosquitto.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_demo(
        tmp_path / "m",
        DemoConfig(nodes=3, rounds=3, seed=0, transport="mqtt", broker=mosquitto.url),
        say=lambda s: None,
    )
    assert resumed.final_params_sha256 == clean.final_params_sha256
    stored = json.loads((tmp_path / "m" / "demo.json").read_text())
    assert stored["transport"] == "mqtt"  # it really ran (and resumed) over the broker


# --------------------------------------------------------------------------- the run's files


def test_an_unreadable_demo_json_is_a_clear_error(tmp_path: Path) -> None:
    from fedsm.cli import main as cli_main
    from fedsm.cli.demo.run import DemoFileError

    stored = tmp_path / "demo.json"
    for content in (b"", b"{not json", b'{"nodes": 3, "colour": "blue"}', b"[1, 2]"):
        stored.write_bytes(content)
        with pytest.raises(DemoFileError) as caught:
            run_demo(tmp_path, DemoConfig(nodes=3, rounds=1), say=lambda s: None)
        assert caught.value.path == stored
        assert "new directory" in str(caught.value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["demo", "--run-dir", str(tmp_path), "--rounds", "1"])
    assert code == 2
    assert err.getvalue().startswith(f"fedsm: error: {stored}: ")
    assert not (tmp_path / "researcher").exists()  # nothing was started


def test_settings_files_are_replaced_whole(tmp_path: Path) -> None:
    from fedsm.cli.demo.run import read_json, write_json_atomic

    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert read_json(target, "") == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary file left


def test_empty_caches_are_recomputed(memory_run, tmp_path: Path) -> None:
    """results.json and local.json are caches of what the log and the data say: an empty one
    (an older version's torn write) is computed again, without training the federation."""
    run_dir, result, _ = memory_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "results.json").write_bytes(b"")
    (copy / "local.json").write_bytes(b"")
    log_bytes = (copy / "researcher" / "job.log").read_bytes()
    again = run_demo(copy, DemoConfig(nodes=3, rounds=ROUNDS, seed=7), say=lambda s: None)
    assert again.final_params_sha256 == result.final_params_sha256
    assert again.local_accuracy == result.local_accuracy
    assert again.log == str(copy.resolve() / "researcher" / "job.log")
    assert json.loads((copy / "results.json").read_text())["final_params_sha256"] == (
        result.final_params_sha256
    )
    assert json.loads((copy / "local.json").read_text())["local_accuracy"] == result.local_accuracy
    assert (copy / "researcher" / "job.log").read_bytes() == log_bytes  # nothing appended


def test_an_empty_mqtt_json_is_recomputed_before_the_job_starts_only(
    memory_run, tmp_path: Path
) -> None:
    from fedsm.cli.demo.mqtt import _repository_port
    from fedsm.cli.demo.run import DemoFileError

    settings = tmp_path / "mqtt.json"
    settings.write_bytes(b"")
    port = _repository_port(tmp_path)  # no job log yet: a new port
    assert json.loads(settings.read_text())["repository_port"] == port
    assert settings.stat().st_mode & 0o777 == 0o600  # it holds the repository token
    assert _repository_port(tmp_path) == port  # kept
    run_dir, _, _ = memory_run
    (tmp_path / "researcher").mkdir()
    shutil.copy(run_dir / "researcher" / "job.log", tmp_path / "researcher" / "job.log")
    settings.write_bytes(b"")
    with pytest.raises(DemoFileError, match="repository_port"):
        _repository_port(tmp_path)  # the log may name the old port's URLs
