"""The exact source of a plan, and its digest, from a notebook cell, a file or a module.

- A plan class typed in an IPython cell (as in a Jupyter notebook) gives the same source and
  sha256 in every session (IPython keeps the cell's text in ``linecache``; the cell's number
  is not part of the source), and that source imports on a node.
- ``fedsm plan hash FILE_OR_MODULE:CLASS`` prints the digest a real Job records
  (``TrainingPlanUploaded.sha256``) and that ``fedsm node plan approve FILE`` registers for
  the job's saved file; its errors are one line and exit 2.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import linecache
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from fedsm.cli import main
from fedsm.core.events import TrainingPlanUploaded
from fedsm.log.read import scan
from fedsm.repository import LocalRepository
from fedsm.researcher.errors import JobError
from fedsm.researcher.job import Job
from fedsm.researcher.plansource import plan_source
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.training.loader import load_plan_class, loaded_plan_class, unload_plan_class
from fedsm.training.plan import PlanError, TorchTrainingPlan
from fedsm.transport import MemoryBroker, MemoryBus

IPYTHON_TIMEOUT_S = 120
CLI_TIMEOUT_S = 120

IMPORTS_CELL = (
    "import torch\nfrom torch import nn\nfrom fedsm.training.plan import TorchTrainingPlan\n"
)

# The README's plan, as a researcher types it in a notebook cell.
PLAN_CELL = '''class LogisticPlan(TorchTrainingPlan):
    """What runs on every node: the plan's exact source is what nodes approve by sha256."""

    def init_dependencies(self) -> list[str]:
        return ["from torch import nn"]

    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_step(self, data, target):
        logits = self.model()(data).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, target.float())
'''

# The plan as a file: the cell's imports, then the class.
PLAN_FILE = IMPORTS_CELL + "\n\n" + PLAN_CELL


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _job_plan_sha(tmp: Path, **plan: object) -> tuple[str, Path]:
    """The TrainingPlanUploaded.sha256 a real Job records for ``plan``, and its saved file."""
    broker = MemoryBroker()
    bus = MemoryBus(broker, "researcher-test", role="researcher")
    try:
        job = Job(
            reqs=Requests(bus, default_deadline_s=1.0),
            data=FederatedDataSet({"node-a": {"dataset_id": "dataset-a", "data_type": "csv"}}),
            training_args={"lr": 0.1, "epochs": 1, "batch_size": 8},
            model_args={"n_features": 3},
            run_dir=tmp / "run",
            repository=LocalRepository(tmp / "repository"),
            durability="never",
            **plan,
        )
        try:
            saved = job.training_plan_file
        finally:
            job.close()
    finally:
        bus.close()
        broker.close()
    uploaded = [
        r.event
        for r in scan(tmp / "run" / "job.log").records
        if isinstance(r.event, TrainingPlanUploaded)
    ]
    assert len(uploaded) == 1
    assert _sha(saved.read_bytes()) == uploaded[0].sha256
    return uploaded[0].sha256, saved


# --------------------------------------------------------------------------- notebook cells

# Run inside `python -m IPython -c`: each run_cell is a cell of its own, as in a notebook.
SESSION = r"""
import json, os
ip = get_ipython()
with open(os.environ["FEDSM_TEST_CELLS"], encoding="utf-8") as cells:
    cells = json.load(cells)
for cell in cells:
    result = ip.run_cell(cell, store_history=True)
    result.raise_error()
"""

REPORT_CELL = r"""
import inspect, json, tempfile
from pathlib import Path
from fedsm.researcher.plansource import plan_source
from fedsm.digests import sha256_hex
from fedsm.transport import MemoryBroker, MemoryBus
from fedsm.repository import LocalRepository
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.core.events import TrainingPlanUploaded
from fedsm.log.read import scan

try:
    inspect.getsource(LogisticPlan)
    inspect_error = None
except (OSError, TypeError) as exc:
    inspect_error = str(exc)
source, name = plan_source(LogisticPlan, None)
with tempfile.TemporaryDirectory() as tmp:
    broker = MemoryBroker()
    bus = MemoryBus(broker, "researcher-test", role="researcher")
    job = Job(
        reqs=Requests(bus, default_deadline_s=1.0),
        training_plan_class=LogisticPlan,
        data=FederatedDataSet({"node-a": {"dataset_id": "dataset-a"}}),
        training_args={"lr": 0.1, "epochs": 1, "batch_size": 8},
        model_args={"n_features": 3},
        run_dir=Path(tmp) / "run",
        repository=LocalRepository(Path(tmp) / "repository"),
        durability="never",
    )
    job.close()
    bus.close()
    broker.close()
    job_sha = [r.event.sha256 for r in scan(Path(tmp) / "run" / "job.log").records
               if isinstance(r.event, TrainingPlanUploaded)]
print("RESULT " + json.dumps({
    "filename": LogisticPlan.init_model.__code__.co_filename,
    "inspect_error": inspect_error,
    "source": source,
    "name": name,
    "sha256": sha256_hex(source.encode("utf-8")),
    "job_sha256": job_sha,
}))
"""


def _ipython_session(cells: list[str], cwd: Path) -> dict:
    cells_file = cwd / f"cells-{uuid.uuid4().hex}.json"
    cells_file.write_text(json.dumps(cells), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            "--quick",
            "--no-banner",
            "--colors=nocolor",
            "--HistoryManager.hist_file=:memory:",
            "-c",
            SESSION,
        ],
        capture_output=True,
        text=True,
        timeout=IPYTHON_TIMEOUT_S,
        cwd=cwd,
        env={**os.environ, "IPYTHONDIR": str(cwd / "ipython"), "FEDSM_TEST_CELLS": str(cells_file)},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    return json.loads(lines[0][len("RESULT ") :])


def test_a_plan_typed_in_an_ipython_cell_has_one_digest_in_every_session(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("IPython")
    first = _ipython_session([IMPORTS_CELL, PLAN_CELL, REPORT_CELL], tmp_path)
    # Another session, another history: the plan cell is a later cell (another cell name).
    second = _ipython_session(
        ["x = 1\n", "y = x + 1\n", IMPORTS_CELL, "# unrelated\n", PLAN_CELL, REPORT_CELL],
        tmp_path,
    )
    for run in (first, second):
        assert run["filename"].startswith("<ipython-input-")
        assert run["inspect_error"] is not None  # what fedsm had to work around
        assert run["name"] == "LogisticPlan"
        assert run["job_sha256"] == [run["sha256"]]  # Experiment/Job use the same source
    assert first["filename"] != second["filename"]
    assert first["source"] == second["source"]
    assert first["sha256"] == second["sha256"] == _sha(first["source"])
    source = first["source"]
    assert PLAN_CELL in source
    compile(source, "<plan>", "exec", dont_inherit=True)
    cls = load_plan_class(source, "LogisticPlan")  # as a node imports it
    try:
        plan = cls()
        plan.post_init({"n_features": 3}, {"lr": 0.1, "batch_size": 2})
        plan.training_step(__import__("torch").ones(2, 3), __import__("torch").ones(2))
        # A node saving the loaded plan again gets the same bytes.
        assert plan.source() == source
    finally:
        unload_plan_class(cls)
    # The same cell's text in a file, imported as a class, gives the same source too.
    plan_file = tmp_path / "logistic.py"
    plan_file.write_text(PLAN_FILE, encoding="utf-8")
    assert _hash(capsys, f"{plan_file}:LogisticPlan") == first["sha256"]


def _cell(text: str, number: int, namespace: dict | None = None) -> dict:
    """Run ``text`` as IPython/ipykernel do: compiled under a cell name kept in linecache,
    in a namespace whose ``__name__`` is ``__main__`` (the module inspect can not read)."""
    name = f"<ipython-input-{number}-{uuid.uuid4().hex[:12]}>"
    lines = [line + "\n" for line in text.splitlines()]
    linecache.cache[name] = (len(text), None, lines, name)
    namespace = namespace if namespace is not None else {"__name__": "__main__"}
    exec(compile(text, name, "exec", dont_inherit=True), namespace)  # noqa: S102
    return namespace


def test_a_cell_class_source_is_cut_out_of_the_cell_text() -> None:
    ns = _cell(IMPORTS_CELL, 1)
    _cell("helper = 3\n\n\n" + PLAN_CELL + "\nprint_me = helper\n", 2, ns)
    source, name = plan_source(ns["LogisticPlan"], None)
    assert name == "LogisticPlan"
    assert PLAN_CELL in source and "helper" not in source
    again = _cell(IMPORTS_CELL, 7)
    _cell(PLAN_CELL, 8, again)
    assert plan_source(again["LogisticPlan"], None)[0] == source
    with loaded_plan_class(source, "LogisticPlan") as cls:
        assert issubclass(cls, TorchTrainingPlan)


def test_a_class_redefined_in_a_later_cell_keeps_its_own_source() -> None:
    ns = _cell(IMPORTS_CELL, 1)
    _cell(PLAN_CELL, 2, ns)
    old = ns["LogisticPlan"]
    _cell(PLAN_CELL.replace("nn.Linear(", "nn.Bilinear(") + "\n# v2\n", 3, ns)
    new = ns["LogisticPlan"]
    assert "nn.Linear(" in plan_source(old, None)[0]
    assert "nn.Bilinear(" in plan_source(new, None)[0]


def test_decorated_static_and_property_members_and_a_cell_base_class() -> None:
    ns = _cell(IMPORTS_CELL + "import functools\n", 1)
    _cell(
        textwrap.dedent(
            """
            class Base(TorchTrainingPlan):
                def init_dependencies(self):
                    return ["from torch import nn", "import functools"]

                def init_model(self, model_args):
                    return nn.Linear(2, 1)
            """
        ),
        2,
        ns,
    )
    cell = textwrap.dedent(
        """
        def traced(f):
            @functools.wraps(f)
            def inner(*a, **k):
                return f(*a, **k)
            return inner


        class Plan(Base):
            @traced
            def training_step(self, data, target):
                return self.model()(data).sum() * self.scale()

            @staticmethod
            def scale():
                return 1.0

            @property
            def name(self):
                return "p"
        """
    )
    _cell(cell, 3, ns)
    with pytest.raises(PlanError, match="does not import on its own"):
        plan_source(ns["Plan"], None)  # `traced` lives in the cell, not in the class
    _cell(cell.replace("    @traced\n", ""), 4, ns)
    source, _ = plan_source(ns["Plan"], None)
    assert source.index("class Base(") < source.index("class Plan(Base)")
    assert "def scale" in source and "def name" in source


def test_a_class_whose_text_is_nowhere_is_refused_clearly() -> None:
    ns = {"__name__": "__main__", "TorchTrainingPlan": TorchTrainingPlan}
    code = "class Ghost(TorchTrainingPlan):\n    def init_model(self, a):\n        return None\n"
    exec(compile(code, "<string-never-cached>", "exec"), ns)  # noqa: S102
    with pytest.raises(PlanError, match="Ghost"):
        plan_source(ns["Ghost"], None)


def test_a_file_plan_keeps_exactly_the_source_inspect_gives() -> None:
    from fedsm.training.demo_plan import BreastCancerPlan

    source, _ = plan_source(BreastCancerPlan, None)
    assert textwrap.dedent(inspect.getsource(BreastCancerPlan)).rstrip() in source


def test_plan_source_refuses_a_class_that_is_not_a_plan() -> None:
    with pytest.raises(JobError, match="TorchTrainingPlan subclass"):
        plan_source(dict, None)


def test_a_plan_file_is_uploaded_as_its_exact_bytes(tmp_path: Path) -> None:
    crlf = tmp_path / "crlf_plan.py"
    crlf.write_bytes(PLAN_FILE.replace("\n", "\r\n").encode("utf-8"))
    source, name = plan_source("LogisticPlan", crlf)
    assert source.encode("utf-8") == crlf.read_bytes()
    job_sha, saved = _job_plan_sha(
        tmp_path, training_plan_class="LogisticPlan", training_plan_path=crlf
    )
    assert job_sha == _sha(crlf.read_bytes()) == _sha(saved.read_bytes())
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(JobError, match="not UTF-8"):
        plan_source("LogisticPlan", latin)


# --------------------------------------------------------------------------- fedsm plan hash


def _hash(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(["plan", "hash", *args]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.split()) == 1, out
    return out.strip()


def _error(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(["plan", "hash", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsm: error: "), captured.err
    return lines[0]


def _import_file(path: Path) -> type:
    import importlib.util

    name = f"plan_under_test_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.LogisticPlan


def test_plan_hash_is_what_the_job_records_and_the_node_approves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan_file = tmp_path / "logistic.py"
    plan_file.write_text(PLAN_FILE, encoding="utf-8")
    printed = _hash(capsys, f"{plan_file}:LogisticPlan", "--out", str(tmp_path / "out.py"))
    job_sha, saved = _job_plan_sha(tmp_path, training_plan_class=_import_file(plan_file))
    assert printed == job_sha
    assert (tmp_path / "out.py").read_bytes() == saved.read_bytes()
    # The node operator approves the job's saved file: the same digest is registered.
    node = tmp_path / "node"
    assert main(["node", "init", "--dir", str(node), "--id", "node-a"]) == 0
    assert main(["node", "plan", "approve", "--dir", str(node), str(saved), "--by", "op"]) == 0
    capsys.readouterr()
    assert main(["node", "plan", "list", "--dir", str(node), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["sha256"], r["status"]) for r in rows] == [(printed, "approved")]
    # The saved file hashes the same, as a class and as written.
    assert _hash(capsys, f"{saved}:LogisticPlan") == printed
    assert _hash(capsys, f"{saved}:LogisticPlan", "--verbatim") == printed


def test_plan_hash_verbatim_is_what_a_job_given_the_path_records(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan_file = tmp_path / "with_extras.py"
    plan_file.write_text(PLAN_FILE + "\n\nUNUSED = 1  # a file uploaded as written\n")
    printed = _hash(capsys, f"{plan_file}:LogisticPlan", "--verbatim")
    job_sha, _ = _job_plan_sha(
        tmp_path, training_plan_class="LogisticPlan", training_plan_path=plan_file
    )
    assert printed == job_sha == _sha(plan_file.read_bytes())
    assert _hash(capsys, f"{plan_file}:LogisticPlan") != printed  # the class alone


def test_plan_hash_of_a_module_from_the_console_script(tmp_path: Path) -> None:
    package = f"plans_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "logistic.py").write_text(
        PLAN_FILE + "\nprint('imported')  # output of the plan's module goes to stderr\n"
    )
    fedsm = Path(sys.executable).with_name("fedsm")
    command = [str(fedsm)] if fedsm.is_file() else [sys.executable, "-m", "fedsm"]
    result = subprocess.run(
        [*command, "plan", "hash", f"{package}.logistic:LogisticPlan"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        cls = importlib.import_module(f"{package}.logistic").LogisticPlan
    finally:
        sys.path.remove(str(tmp_path))
    job_sha, _ = _job_plan_sha(tmp_path, training_plan_class=cls)
    assert result.stdout == job_sha + "\n"


def test_plan_hash_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert "does not exist" in _error(capsys, f"{tmp_path / 'missing.py'}:LogisticPlan")
    broken = tmp_path / "broken.py"
    broken.write_text("import module_that_is_not_there_at_all\n")
    assert "does not import" in _error(capsys, f"{broken}:LogisticPlan")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("class (:\n")
    assert "does not import: SyntaxError" in _error(capsys, f"{syntax}:LogisticPlan")
    assert "does not import" in _error(capsys, "no_such_package_here.plans:LogisticPlan")
    assert "not a TorchTrainingPlan" in _error(capsys, "fedsm.training.plan:PlanError")
    assert "not a TorchTrainingPlan" in _error(capsys, "fedsm.training.plan:BASE_IMPORTS")
    assert "defines no Nope" in _error(capsys, "fedsm.training.plan:Nope")
    assert "give path/to/file.py:ClassName" in _error(capsys, "fedsm.training.plan")
    assert "--verbatim hashes a file" in _error(
        capsys, "fedsm.training.demo_plan:BreastCancerPlan", "--verbatim"
    )
