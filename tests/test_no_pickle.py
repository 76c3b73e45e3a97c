"""No pickle anywhere: a node trains, and the whole MQTT demo runs, with ``pickle.load``,
``pickle.loads``, ``pickle.Unpickler`` and ``torch.load`` made to raise in every process.

The ban is a ``sitecustomize`` module (written to a temporary directory put first on
``PYTHONPATH``): every Python process started with that environment (the demo's researcher,
its repository server and node processes, their training workers) loads it at start-up.
Each process records itself in ``FEDSM_NO_PICKLE_DIR`` (``seen-<pid>``: its command line), and
every attempt to unpickle is recorded there too (``attempt-<pid>``) before it raises, so an
attempt swallowed by some ``except`` still fails the test. A canary plan checks the ban bites
in the worker; the test process itself is patched around the trainings it drives.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from broker_fixture import mosquitto  # noqa: F401
from plans import initial_params, plan_bytes, write_csv

from fedsm.node.errors import TrainingFailed
from fedsm.node.executor import TrainingTask
from fedsm.node.process_executor import ProcessTrainingExecutor
from fedsm.repository import LocalRepository

MARKER_ENV = "FEDSM_NO_PICKLE_DIR"

SITECUSTOMIZE = r'''
"""Test hook (tests/test_no_pickle.py): unpickling raises in this process, and is recorded."""
import os
import sys

_DIR = os.environ.get("FEDSM_NO_PICKLE_DIR")


def _cmdline():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            line = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        line = " ".join(sys.argv)
    return line.replace("\n", "\\n")  # one record per line


def _record(kind, what):
    if _DIR:
        with open(os.path.join(_DIR, f"{kind}-{os.getpid()}"), "a") as f:
            f.write(f"{what}\t{_cmdline()}\n")


class PickleForbidden(RuntimeError):
    pass


def _refuse(what):
    _record("attempt", what)
    raise PickleForbidden(f"{what} is forbidden in this process ({os.getpid()})")


def _function(what):
    def forbidden(*args, **kwargs):
        _refuse(what)

    return forbidden


def _class(base, what):
    class Forbidden(base):  # still a class: code may subclass it at import time
        def __init__(self, *args, **kwargs):
            _refuse(what)

    Forbidden.__name__ = Forbidden.__qualname__ = base.__name__
    return Forbidden


import pickle  # noqa: E402
import _pickle  # noqa: E402

for _module in (pickle, _pickle):
    _module.loads = _function("pickle.loads")
    _module.load = _function("pickle.load")
    _module.Unpickler = _class(_module.Unpickler, "pickle.Unpickler")
pickle._loads = _function("pickle._loads")
pickle._load = _function("pickle._load")
pickle._Unpickler = _class(pickle._Unpickler, "pickle._Unpickler")


class _TorchLoadBan:
    """Meta-path finder: once torch is imported, replace torch.load (and the function it
    is, torch.serialization.load) by a refusal."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_ban(module):
            exec_module(module)
            module.load = _function("torch.load")
            serialization = sys.modules.get("torch.serialization")
            if serialization is not None:
                serialization.load = module.load

        spec.loader.exec_module = exec_and_ban
        sys.meta_path.remove(self)
        return spec


sys.meta_path.insert(0, _TorchLoadBan())
_record("seen", "started")
'''


@pytest.fixture
def ban(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the ban on ``PYTHONPATH`` (first) for every process started from now on; return
    the directory where processes record themselves and their attempts."""
    site_dir = tmp_path / "no-pickle-site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    records = tmp_path / "no-pickle-records"
    records.mkdir()
    parts = [str(site_dir), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(parts))
    monkeypatch.setenv(MARKER_ENV, str(records))
    return records


def _records(records: Path, kind: str) -> dict[int, list[str]]:
    """pid -> lines of the ``kind`` ("seen" or "attempt") records."""
    found = {}
    for path in records.glob(f"{kind}-*"):
        found[int(path.name.split("-", 1)[1])] = path.read_text().splitlines()
    return found


@contextlib.contextmanager
def _banned_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Make unpickling raise in this (the test's) process too; yields the attempts."""
    import _pickle

    import torch
    import torch.serialization

    attempts: list[str] = []

    def refuse(what: str):
        def forbidden(*args, **kwargs):
            attempts.append(what)
            raise RuntimeError(f"{what} is forbidden in the test process")

        return forbidden

    with monkeypatch.context() as patch:
        for module in (pickle, _pickle):
            patch.setattr(module, "loads", refuse("pickle.loads"))
            patch.setattr(module, "load", refuse("pickle.load"))
            patch.setattr(module, "Unpickler", refuse("pickle.Unpickler"))
        patch.setattr(pickle, "_loads", refuse("pickle._loads"))
        patch.setattr(pickle, "_load", refuse("pickle._load"))
        patch.setattr(pickle, "_Unpickler", refuse("pickle._Unpickler"))
        patch.setattr(torch, "load", refuse("torch.load"))
        patch.setattr(torch.serialization, "load", refuse("torch.load"))
        yield attempts


CANARY_PLANS = """

import io as _io
import pickle as _pickle

import torch as _torch


class UnpicklingPlan(LinearPlan):
    def training_step(self, data, target):
        _pickle.loads(_pickle.dumps(1))
        return super().training_step(data, target)


class TorchLoadingPlan(LinearPlan):
    def training_step(self, data, target):
        _torch.load(_io.BytesIO(b""))
        return super().training_step(data, target)
"""


def test_a_node_worker_trains_with_pickle_forbidden(
    ban: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = plan_bytes("linear_plan.py") + CANARY_PLANS.encode()
    repo = LocalRepository(tmp_path / "repo")
    params = initial_params(repo, plan_bytes("linear_plan.py"), "LinearPlan", tmp_path)
    _, params_path = repo.download_file(params["file"], tmp_path / "p.safetensors")
    csv = write_csv(tmp_path / "d.csv")

    def task(plan_class: str) -> TrainingTask:
        return TrainingTask(
            plan_source=source.decode(),
            plan_class=plan_class,
            model_args={"in_features": 3},
            training_args={"epochs": 2, "batch_size": 5},
            params_path=str(params_path),
            dataset={"data_type": "csv", "path": str(csv), "target": "target"},
            seed=7,
            out_path=str(tmp_path / f"{plan_class}.safetensors"),
        )

    executor = ProcessTrainingExecutor(time_limit_s=120)
    try:
        with _banned_here(monkeypatch) as in_parent:
            outcome = executor.train(task("LinearPlan"))
            assert outcome.sample_size > 0 and len(outcome.params_sha256) == 64
            assert in_parent == []
            assert _records(ban, "attempt") == {}
            seen = _records(ban, "seen")
            assert "fedsm.node.worker_main" in seen[executor.worker_pid][0]  # the ban was on

            # The ban bites in the worker: a plan that unpickles fails, and is recorded.
            for plan_class, what in [("UnpicklingPlan", "pickle"), ("TorchLoadingPlan", "torch")]:
                with pytest.raises(TrainingFailed, match="PickleForbidden"):
                    executor.train(task(plan_class))
                attempts = _records(ban, "attempt")
                assert list(attempts) == [executor.worker_pid]
                assert attempts[executor.worker_pid][-1].startswith(f"{what}.load")
            assert in_parent == []
    finally:
        executor.close()


# --------------------------------------------------------------------------- the MQTT demo

DEMO_OPTIONS = ["--nodes", "2", "--rounds", "2", "--seed", "7"]


def _ours(records: Path) -> list[psutil.Process]:
    """Running processes that recorded themselves under ``records`` and still carry its
    marker in their environment (so a reused PID is never taken for ours)."""
    found = []
    for pid in _records(records, "seen"):
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == str(records):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_all(records: Path, within_s: float) -> list[str]:
    """Wait up to ``within_s`` for every process of the run to end; kill (by PID) and
    describe those that did not."""
    end = time.monotonic() + within_s
    left = _ours(records)
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = _ours(records)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
            proc.kill()
    return described


def _demo(run_dir: Path, records: Path, *extra: str) -> dict[str, str]:
    """Run ``fedsm demo`` to its end; its ``key=value`` lines. No process of it survives."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedsm", "demo", "--run-dir", str(run_dir), *DEMO_OPTIONS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGKILL)
            demo.wait(10)
        left = _stop_all(records, within_s=20)
    assert demo.returncode == 0, out[-3000:] + err[-3000:]
    assert not left, f"processes left behind: {left}"
    assert "PickleForbidden" not in err, err[-3000:]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.mqtt
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_mqtt_demo_runs_with_pickle_forbidden_in_every_process(
    ban: Path,
    tmp_path: Path,
    mosquitto,  # noqa: F811
) -> None:
    """Researcher, repository server, node processes and their workers: none unpickles, and
    the run ends on the same parameters as the memory demo (which runs under the ban too)."""
    memory = _demo(tmp_path / "memory", ban)
    mqtt = _demo(tmp_path / "mqtt", ban, "--transport", "mqtt", "--broker", mosquitto.url)
    assert mqtt["final_params_sha256"] == memory["final_params_sha256"]
    assert _records(ban, "attempt") == {}
    commands = [lines[0].split("\t", 1)[1] for lines in _records(ban, "seen").values()]
    assert sum(" demo " in c and "--transport mqtt" in c for c in commands) == 1, commands
    assert sum(" repo serve " in c for c in commands) == 1, commands
    assert sum(" node start " in c for c in commands) == 2, commands
    assert sum("fedsm.node.worker_main" in c for c in commands) >= 2, commands


def test_the_ban_itself_refuses(ban: Path) -> None:
    """The hook really loads in a child and refuses each entry point (guards the guard)."""
    probe = (
        "import io, pickle, torch\n"
        "data = pickle.dumps([1])\n"
        "for call in (lambda: pickle.loads(data), lambda: pickle.load(io.BytesIO(data)),\n"
        "             lambda: pickle.Unpickler(io.BytesIO(data)).load(),\n"
        "             lambda: torch.load(io.BytesIO(data))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        assert type(exc).__name__ == 'PickleForbidden', exc\n"
        "    else:\n"
        "        raise SystemExit('not refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split("\t")[0] for line in next(iter(_records(ban, "attempt").values()))] == [
        "pickle.loads",
        "pickle.load",
        "pickle.Unpickler",
        "torch.load",
    ]
