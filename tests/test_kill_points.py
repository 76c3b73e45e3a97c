"""Kill it anywhere, move it anywhere, resume to the same bytes.

(a) The memory-bus demo is cut right after EVERY record of an uninterrupted run's log (the
    kill simulated in-process, see :func:`killed_in_process`), then rerun on the same
    directory: each ends on the uninterrupted run's final parameters and its log passes
    ``fedsm replay --verify --repo``. A handful of points use a real SIGKILL instead.
(b) A run killed mid-round, its directory moved elsewhere, resumed there.
(c) The MQTT demo (real node and repository processes, a private broker) killed with SIGKILL
    during node set-up and at four points of the job, each resumed by rerunning the demo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from broker_fixture import mosquitto  # noqa: F401
from researcher_kill import RECORD, append_hook, kill_after

from fedsm.cli import main as cli_main
from fedsm.cli.demo.run import DemoConfig, DemoResult, run_demo
from fedsm.log import EventLog, scan

HERE = Path(__file__).parent
ROUNDS, NODES = 3, 3
CONFIG = DemoConfig(nodes=NODES, rounds=ROUNDS, seed=0)
STARTED = time.monotonic()


class SimulatedKill(BaseException):
    """Raised right after the chosen record is durable; not an Exception, so no handler meant
    for errors catches it."""


@pytest.fixture(scope="module", autouse=True)
def _timing() -> Iterator[None]:
    start = time.monotonic()
    yield
    print(f"\ntest_kill_points.py: {time.monotonic() - start:.1f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """The uninterrupted memory run: its final digest and its log's record types."""
    run_dir = tmp_path_factory.mktemp("clean")
    result = run_demo(run_dir, CONFIG, say=lambda s: None)
    return result.final_params_sha256, _names(Path(result.log))


def _names(log_path: Path) -> list[str]:
    return [type(r.event).__name__ for r in scan(log_path).records]


def killed_in_process(
    run_dir: Path, point: str, nth: int, config: DemoConfig = CONFIG
) -> list[str]:
    """Run the memory demo in ``run_dir`` and stop it as a kill would, right after the
    ``nth`` record (``point`` = ``record``) or ``nth`` event of type ``point`` is durable.

    After that point nothing more reaches the log (further appends raise before writing),
    and the logs the run had open are closed, as the kernel would on a kill. Returns the
    record types of the log left behind.
    """
    reached = kill_after(point, nth)
    dead = threading.Event()
    logs: list[EventLog] = []
    caller = threading.current_thread()
    strays: list[str] = []

    def before(log: EventLog, events: Sequence[object]) -> None:
        if log not in logs:
            logs.append(log)
        if dead.is_set():
            raise SimulatedKill("appended after the kill")

    def after(events: Sequence[object]) -> None:
        if threading.current_thread() is not caller:
            strays.append(threading.current_thread().name)
        if reached(events):
            dead.set()
            raise SimulatedKill(f"after {point} #{nth}")

    try:
        with append_hook(after, before=before):
            run_demo(run_dir, config, say=lambda s: None)
    except SimulatedKill:
        pass
    else:
        pytest.fail(f"the run ended without reaching {point} #{nth}")
    finally:
        for log in logs:
            log.close()
    assert not strays, f"records appended outside the researcher's thread: {strays}"
    log_path = run_dir / "researcher" / "job.log"
    return _names(log_path) if log_path.exists() else []


def _cut_after_record(log_path: Path, k: int, *, torn_bytes: int) -> None:
    """Truncate the log after its k-th record, keeping ``torn_bytes`` of the next one."""
    records = scan(log_path).records
    end = records[k].offset + torn_bytes
    with open(log_path, "r+b") as f:
        f.truncate(end)
    assert [r.seq for r in scan(log_path).records] == list(range(1, k + 1))


def killed_by_sigkill(
    run_dir: Path, point: str, nth: int, broker: str | None = None
) -> subprocess.CompletedProcess:
    args = [sys.executable, str(HERE / "researcher_kill.py"), str(run_dir), point, str(nth)]
    args += [str(ROUNDS), str(NODES), *([broker] if broker else [])]
    # Output to files, not pipes: a child of the killed researcher that still holds its
    # stderr for a moment must not make this wait; leftovers are the callers' to check.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        try:
            code = proc.wait(timeout=280)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    done = subprocess.CompletedProcess(args, code, stdout, stderr)
    assert code == -signal.SIGKILL, (
        f"the researcher ended with {code} (None: still running after 280 s), not SIGKILL at "
        f"{point} #{nth}:\n" + stdout[-2000:] + stderr[-3000:]
    )
    return done


def verify_in_process(run_dir: Path) -> tuple[int, str]:
    """``fedsm replay LOG --verify --repo RUN_DIR/repository``, through the CLI's main."""
    out = io.StringIO()
    log_path = run_dir / "researcher" / "job.log"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(
            ["replay", str(log_path), "--verify", "--repo", str(run_dir / "repository")]
        )
    return code, out.getvalue()


def verify_cli(run_dir: Path) -> None:
    """The same, as its own process (the exit code a user sees)."""
    log_path = run_dir / "researcher" / "job.log"
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", str(log_path), "--verify", "--repo"]
        + [str(run_dir / "repository")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def resume_memory(
    run_dir: Path, digest: str, had_records: bool, config: DemoConfig = CONFIG
) -> DemoResult:
    said: list[str] = []
    result = run_demo(run_dir, config, say=said.append)
    assert any("resuming" in line for line in said) == had_records, said
    assert result.final_params_sha256 == digest
    names = _names(Path(result.log))
    assert names.count("Aggregated") == ROUNDS and names[-1] == "JobCompleted", names
    return result


# --------------------------------------------------------------------------- (a) memory


def test_every_append_point_resumes_to_the_same_bytes(
    tmp_path: Path, clean: tuple[str, list[str]]
) -> None:
    """The demo cut right after record k, for every k of the uninterrupted log, then rerun."""
    digest, clean_names = clean
    failures: list[str] = []
    start = time.monotonic()
    for k in range(1, len(clean_names) + 1):
        run_dir = tmp_path / f"k{k:03d}"
        what = f"k={k} (after {clean_names[k - 1]})"
        try:
            left = killed_in_process(run_dir, RECORD, k)
            # Killed after the append that holds record k returned (several records when
            # they were appended as one write, such as the job's opening).
            assert len(left) >= k and left == clean_names[: len(left)], f"left {left}"
            if len(left) > k:
                # Record k is inside one write: a kill during that write leaves a prefix
                # and a torn record. Cut the log there, as the disk would have it.
                what += f", cut inside a write of {len(left)} records"
                _cut_after_record(run_dir / "researcher" / "job.log", k, torn_bytes=7)
            resume_memory(run_dir, digest, had_records=True)
            code, out = verify_in_process(run_dir)
            assert code == 0, out[-2000:]
        except Exception as exc:  # collect every point's failure, then report them all
            failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:600]}")
    print(
        f"\n{len(clean_names)} kill points in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    assert not failures, f"{len(failures)} of {len(clean_names)} points failed:\n" + "\n".join(
        failures
    )


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        (RECORD, 3),  # right after the opening records
        ("ReplyReceived", NODES + 2),  # mid-collecting, round 2
        ("Aggregated", ROUNDS),  # the last round aggregated, the job not completed
        ("JobCompleted", 1),  # the log is complete, results.json not yet written
    ],
)
def test_sigkill_points_resume_to_the_same_bytes(
    tmp_path: Path, clean: tuple[str, list[str]], point: str, nth: int
) -> None:
    digest, _ = clean
    killed_by_sigkill(tmp_path, point, nth)
    names = _names(tmp_path / "researcher" / "job.log")
    assert names and "results.json" not in os.listdir(tmp_path)
    resume_memory(tmp_path, digest, had_records=True)
    verify_cli(tmp_path)


_CLEAN_DIGESTS: dict[str, str] = {}


@pytest.mark.parametrize("aggregator", ["scaffold", "fedadam"])
@pytest.mark.parametrize(("point", "nth"), [("Aggregated", 1), ("ReplyReceived", NODES + 2)])
def test_a_stateful_strategy_killed_resumes_to_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory, aggregator: str, point: str, nth: int
) -> None:
    """Killed right after a round's aggregate (and the strategy's new state) is recorded, before
    either is uploaded, or mid-round after it: the resumed run ends on the uninterrupted run's
    digest, and the audit finds every state file in the repository and recomputes every round."""
    config = dataclasses.replace(CONFIG, aggregator=aggregator)
    if aggregator not in _CLEAN_DIGESTS:
        clean_dir = tmp_path_factory.mktemp(f"clean-{aggregator}")
        _CLEAN_DIGESTS[aggregator] = run_demo(
            clean_dir, config, say=lambda s: None
        ).final_params_sha256
    run_dir = tmp_path_factory.mktemp(f"killed-{aggregator}")
    left = killed_in_process(run_dir, point, nth, config)
    assert left.count(point) == nth
    resume_memory(run_dir, _CLEAN_DIGESTS[aggregator], True, config)
    code, out = verify_in_process(run_dir)
    assert code == 0, out
    assert f"recomputed with {aggregator}" in out


def test_a_header_only_log_is_a_fresh_start(tmp_path: Path, clean: tuple[str, list[str]]) -> None:
    """Killed right after the log was created, before its first record."""
    digest, clean_names = clean
    (tmp_path / "researcher").mkdir(parents=True)
    EventLog.open(tmp_path / "researcher" / "job.log").close()
    result = resume_memory(tmp_path, digest, had_records=False)
    assert _names(Path(result.log)) == clean_names
    code, out = verify_in_process(tmp_path)
    assert code == 0, out


def test_half_made_memory_nodes_are_completed(tmp_path: Path, clean: tuple[str, list[str]]) -> None:
    """Node directories as a run killed during set-up leaves them: node.toml written but empty
    (node-1), initialised without a dataset (node-2), dataset but no approval (node-3)."""
    from fedsm.cli.demo.run import TAGS, prepare
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.registry import ApprovalRegistry, DatasetRegistry
    from fedsm.node.settings import init_node_dir
    from fedsm.training.datasets import describe_csv

    digest, _ = clean
    files = prepare(tmp_path, CONFIG)
    nodes_dir = tmp_path / "nodes"
    (nodes_dir / "node-1").mkdir(parents=True)
    (nodes_dir / "node-1" / "node.toml").write_bytes(b"")
    init_node_dir(nodes_dir / "node-2", "node-2")
    init_node_dir(nodes_dir / "node-3", "node-3")
    csv = files["nodes"][2]
    meta = describe_csv(csv, "target")
    db = NodeDatabase(nodes_dir / "node-3" / DB_FILE)
    try:
        DatasetRegistry(db).add(
            name="breast-cancer-node-3",
            tags=TAGS,
            data_type="csv",
            path=csv,
            target="target",
            shape=meta["shape"],
            dtypes=list(meta["dtypes"]),
            columns=list(meta["columns"]),
            sample_count=meta["sample_count"],
            dataset_id="dataset-node-3",
        )
    finally:
        db.close()

    resume_memory(tmp_path, digest, had_records=False)
    for k in (1, 2, 3):
        db = NodeDatabase(nodes_dir / f"node-{k}" / DB_FILE)
        try:
            assert [d["dataset_id"] for d in DatasetRegistry(db).list()] == [f"dataset-node-{k}"]
            assert ApprovalRegistry(db).status_of_source(files["plan"].read_bytes()) == "approved"
        finally:
            db.close()


# --------------------------------------------------------------------------- (b) moved


def test_killed_mid_round_moved_and_resumed_elsewhere(
    tmp_path: Path, clean: tuple[str, list[str]]
) -> None:
    digest, _ = clean
    first, second, third = tmp_path / "first", tmp_path / "a" / "second", tmp_path / "third"
    killed_by_sigkill(first, "ReplyReceived", NODES + 2)
    second.parent.mkdir()
    shutil.move(first, second)
    assert not first.exists()
    result = resume_memory(second, digest, had_records=True)
    assert result.log == str(second / "researcher" / "job.log")
    assert result.repository == str(second / "repository")
    verify_cli(second)
    assert str(first).encode() not in (second / "researcher" / "job.log").read_bytes(), (
        "the log names a path of the directory it was moved from"
    )
    # A finished run moved again prints its results with the paths where it is now.
    shutil.move(second, third)
    said: list[str] = []
    again = run_demo(third, CONFIG, say=said.append)
    assert "finished run" in said[0]
    assert again.final_params_sha256 == digest
    assert again.log == str(third / "researcher" / "job.log")
    verify_cli(third)


# --------------------------------------------------------------------------- (c) MQTT


def _our_processes(run_dir: Path) -> list[psutil.Process]:
    """Processes (not this one) whose command line names ``run_dir``: the demo's repository
    server, nodes and set-up steps, and any researcher started on it."""
    needle = str(run_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info.get("cmdline") or []
        if any(needle in part for part in cmdline):
            found.append(proc)
    return found


def _assert_none_left(run_dir: Path, within_s: float = 20.0) -> None:
    """Every process started for ``run_dir`` has ended (children of a killed researcher end
    by PR_SET_PDEATHSIG); any left is killed by its PID and the test fails."""
    end = time.monotonic() + within_s
    left = _our_processes(run_dir)
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        described = [f"{p.pid}: {' '.join(p.cmdline())}" for p in left]
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        pytest.fail(f"processes left behind: {described}")


def _rerun_mqtt_demo(run_dir: Path, broker: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "demo", "--run-dir", str(run_dir)]
        + ["--nodes", str(NODES), "--rounds", str(ROUNDS), "--seed", "0"]
        + ["--transport", "mqtt", "--broker", broker],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def _check_killed(run_dir: Path, point: str, nth: int, before: list[str]) -> list[str]:
    """The log a kill at ``point`` left: grown from ``before`` and ending where it was cut."""
    log_path = run_dir / "researcher" / "job.log"
    names = _names(log_path) if log_path.exists() else []
    if point == "node-setup":
        assert names == [], names
        return names
    assert names[: len(before)] == before and len(names) > len(before), names
    assert "JobCompleted" not in names, names
    if point == RECORD:
        assert len(names) >= len(before) + nth, names  # an append_all may go past nth
    else:
        assert names[len(before) :].count(point) == nth and names[-1] == point, names
    return names


def _finish_mqtt(run_dir: Path, broker: str, digest: str) -> None:
    lines = _rerun_mqtt_demo(run_dir, broker)
    _assert_none_left(run_dir)
    assert lines["final_params_sha256"] == digest
    assert json.loads((run_dir / "demo.json").read_text())["transport"] == "mqtt"
    names = _names(run_dir / "researcher" / "job.log")
    assert names.count("Aggregated") == ROUNDS and names[-1] == "JobCompleted", names
    verify_cli(run_dir)


@pytest.mark.mqtt
def test_mqtt_demo_killed_during_node_setup_resumes_to_the_memory_digest(
    tmp_path: Path,
    clean: tuple[str, list[str]],
    mosquitto,  # noqa: F811
) -> None:
    """Killed once node-1's `fedsm node init` finished (the other nodes anywhere in their
    set-up, their steps killed with the researcher): the rerun finishes every node's set-up."""
    digest, _ = clean
    run_dir = (tmp_path / "run").resolve()
    try:
        killed_by_sigkill(run_dir, "node-setup", 1, mosquitto.url)
        _assert_none_left(run_dir)
        _check_killed(run_dir, "node-setup", 1, [])
        assert (run_dir / "nodes" / "node-1" / "node.toml").exists()
        _finish_mqtt(run_dir, mosquitto.url, digest)
    finally:
        _kill_leftovers(run_dir)


@pytest.mark.mqtt
# Five demo processes in a row, each starting three node processes that import torch: about
# 40 s on a quiet machine, several times that beside the other pytest worker on 2 cores.
@pytest.mark.timeout(900)
def test_mqtt_demo_killed_at_four_points_of_the_job_resumes_to_the_memory_digest(
    tmp_path: Path,
    clean: tuple[str, list[str]],
    mosquitto,  # noqa: F811
) -> None:
    """One run killed with SIGKILL four times in a row, each time resumed by the next run of
    the demo (new node and repository processes): right after the opening records, after an
    ApprovalChecked, after a RoundSent, after a ReplyReceived (points counted from each run's
    start); then a last rerun to the end. One run directory for all, so that the nodes are set
    up once (every python process importing torch costs seconds)."""
    digest, _ = clean
    run_dir = (tmp_path / "run").resolve()
    names: list[str] = []
    try:
        for point, nth in [
            (RECORD, 3),  # right after the opening records
            ("ApprovalChecked", 1),
            ("RoundSent", 2),  # round 2 sent
            ("ReplyReceived", 2),  # mid-collecting round 2 (the re-sent one)
        ]:
            killed_by_sigkill(run_dir, point, nth, mosquitto.url)
            _assert_none_left(run_dir)
            names = _check_killed(run_dir, point, nth, names)
        _finish_mqtt(run_dir, mosquitto.url, digest)
    finally:
        _kill_leftovers(run_dir)


def _kill_leftovers(run_dir: Path) -> None:
    """Never leave a process behind, even when the test failed (by PID)."""
    for proc in _our_processes(run_dir):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
