"""The README's experiment script, run as written, over what it is written for.

The ``python`` block of the README section "A researcher's experiment script" is copied
verbatim into a file and run as a script, in its own directory (so its default run_dir is
the README's, relative). Only what the script itself reads from the environment differs from
the README's defaults (``FEDSM_BROKER_HOST``, ``FEDSM_BROKER_PORT``, ``FEDSM_BROKER_CA``,
``FEDSM_BROKER_PASSWORD``, ``FEDSM_REPOSITORY_URL``, ``FEDSM_REPOSITORY_TOKEN``). It runs
against:

- mosquitto with the *shipped* deployment config (``deploy/mosquitto/mosquitto.conf`` and
  ``acl``: TLS only, a password per participant, topic ACLs), with only file locations and the
  listener rewritten, as ``tests/test_mosquitto_deploy.py`` does;
- ``fedsm repo serve`` with a bearer token;
- two ``fedsm node start`` processes, each with its own broker account, set up by an
  operator's commands (``node init``, ``node dataset add`` with half of the bundled
  breast-cancer data, ``node plan approve FILE`` with the plan's saved source), started
  together with the script: they join during its discovery window.

Every process is stopped by its PID. The script's stdout must be the output the README quotes,
and a second run (which carries on from its run_dir: a finished job) prints it again. About
20-30 s in all on two shared cores.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from broker_fixture import ensure_mosquitto, start_mosquitto
from test_mosquitto_deploy import make_certs

from fedsm.cli.procs import Child
from fedsm.data import breast_cancer_csv, partition_csv
from fedsm.transport.mosquitto import free_port

pytestmark = pytest.mark.mqtt

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEPLOY = ROOT / "deploy" / "mosquitto"
SECTION = "## A researcher's experiment script"
RESEARCHER = "researcher"  # the researcher id of the script and of the shipped acl
NODES = ("hospital-a", "hospital-b")
START_TIMEOUT_S = 60.0
SCRIPT_TIMEOUT_S = 120.0


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = re.compile(r"\n##+ ").search(text, start + len(SECTION)).start()
    return text[start:end]


def readme_script() -> str:
    """The section's ``python`` block, exactly."""
    return re.search(r"```python\n(.*?)```", readme_section(), flags=re.S).group(1)


def readme_output() -> list[str]:
    """The lines of the plain fenced block that follows the script: what it prints."""
    section = readme_section()
    after = section[section.index("```python\n") :]
    after = after[after.index("```\n", len("```python\n")) + 4 :]
    return re.search(r"```\n(.*?)```", after, flags=re.S).group(1).splitlines()


def plan_module(script: str, path: Path) -> Path:
    """The script's imports and plan class, alone in a module (no broker, no experiment)."""
    tree = ast.parse(script)
    keep = [
        ast.get_source_segment(script, node)
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef))
    ]
    path.write_text("\n\n\n".join(keep) + "\n", encoding="utf-8")
    return path


def save_plan(script: str, tmp: Path) -> Path:
    """The file a hospital approves: the plan's source as the script will send it."""
    module_file = plan_module(script, tmp / "readme_plan.py")
    spec = importlib.util.spec_from_file_location("readme_plan", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_plan"] = module
    try:
        spec.loader.exec_module(module)
        plan = tmp / "logistic_plan.py"
        module.LogisticPlan().save_code(plan)
    finally:
        del sys.modules["readme_plan"]
    return plan


def run_ok(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    assert done.returncode == 0, f"fedsm {' '.join(args)}: {done.stderr}"
    return done.stdout


def run_script(script_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the script in its directory (the README's relative default run_dir is there)."""
    return subprocess.run(
        [sys.executable, str(script_file)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env=env,
        cwd=script_file.parent,
    )


def clean_env() -> dict[str, str]:
    """This process's environment without FEDSM_* settings (a node reads them)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FEDSM_")}


class Deployment:
    """The federation the README's script talks to; ``stop()`` ends every process by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwords = {u: f"{u}-{uuid.uuid4().hex}" for u in (RESEARCHER, *NODES)}
        self.token = uuid.uuid4().hex
        self.broker = None
        self.repo: Child | None = None
        self.nodes: dict[str, Child] = {}

    def start_broker(self) -> None:
        ensure_mosquitto()
        for tool in ("mosquitto_passwd", "openssl"):
            assert shutil.which(tool), f"{tool} is needed to run the deployment config"
        etc = self.root / "etc"
        etc.mkdir(parents=True)
        make_certs(etc / "certs")
        self.ca = str(etc / "certs" / "ca.crt")
        for i, (user, password) in enumerate(self.passwords.items()):
            create = ["-c"] if i == 0 else []
            done = subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(etc / "passwd"), user, password],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
        shutil.copy(DEPLOY / "acl", etc / "acl")
        port = free_port()
        text = (DEPLOY / "mosquitto.conf").read_text()
        assert "\nlistener 8883\n" in text and "allow_anonymous false" in text
        text = text.replace("/etc/mosquitto/fedsm/", f"{etc}/")
        text = text.replace("/var/lib/mosquitto/", f"{self.root}/broker-data/")
        text = text.replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
        (self.root / "broker-data").mkdir()
        if os.geteuid() == 0:  # mosquitto started as root drops to the user "mosquitto"
            text += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
        self.broker = start_mosquitto(self.root / "broker", config=text, port=port)

    def start_repository(self) -> None:
        self.repo = Child(
            ["repo", "serve", "--root", str(self.root / "repository"), "--token", self.token],
            name="fedsm repo serve",
            env=clean_env(),
        )
        self.repo_url = self.repo.wait_for_line("repository=", START_TIMEOUT_S).split("=", 1)[1]

    def set_up_node(self, node_id: str, csv: Path, plan: Future[Path]) -> None:
        """What the hospital's operator types (``README.md``, "Running a node")."""
        d = ["--dir", str(self.root / node_id)]
        env = clean_env()
        run_ok(["node", "init", *d, "--id", node_id], env)
        run_ok(
            ["node", "dataset", "add", *d, "--name", "bc", "--tags", "breast-cancer"]
            + ["--type", "csv", "--path", str(csv), "--target", "target"],
            env,
        )
        run_ok(["node", "plan", "approve", *d, str(plan.result()), "--by", "test"], env)

    def start_node(self, node_id: str) -> Child:
        """``fedsm node start``, from the main thread: a child gets SIGTERM when the thread
        that started it ends (``Child``), so never from a pool's thread."""
        broker = f"mqtts://{node_id}@127.0.0.1:{self.broker.port}?ca_certs={self.ca}"
        secrets = {  # never on a command line (README, "Running a node": FEDSM_<KEY>)
            "FEDSM_BROKER_PASSWORD": self.passwords[node_id],
            "FEDSM_REPOSITORY_TOKEN": self.token,
        }
        child = Child(
            ["node", "start", "--dir", str(self.root / node_id), "--broker", broker]
            + ["--repo", self.repo_url],
            name=f"fedsm node start ({node_id})",
            env={**clean_env(), **secrets},
        )
        self.nodes[node_id] = child
        return child

    def script_env(self) -> dict[str, str]:
        """What the README's script reads from the environment."""
        return {
            **clean_env(),
            "FEDSM_BROKER_HOST": "127.0.0.1",
            "FEDSM_BROKER_PORT": str(self.broker.port),
            "FEDSM_BROKER_CA": self.ca,
            "FEDSM_BROKER_PASSWORD": self.passwords[RESEARCHER],
            "FEDSM_REPOSITORY_URL": self.repo_url,
            "FEDSM_REPOSITORY_TOKEN": self.token,
        }

    def stop(self) -> dict[str, int]:
        codes = {}
        for node_id, child in self.nodes.items():
            codes[node_id] = child.stop(timeout_s=20)
        if self.repo is not None:
            codes["repository"] = self.repo.stop()
        if self.broker is not None:
            self.broker.stop()
        return codes


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    world = Deployment(tmp_path / "deploy")
    try:
        yield world
    finally:
        world.stop()


def test_readme_script_runs_over_the_deployment_broker_and_node_processes(
    tmp_path: Path, deployment: Deployment
) -> None:
    script = readme_script()
    expected = readme_output()
    shares = partition_csv(breast_cancer_csv(), len(NODES), tmp_path / "data", seed=0)

    with ThreadPoolExecutor(len(NODES) + 1) as pool:
        # Each hospital registers its data while the researcher saves the plan they approve,
        # and the broker and the repository start.
        plan = pool.submit(save_plan, script, tmp_path)
        nodes = [
            pool.submit(deployment.set_up_node, node_id, csv, plan)
            for node_id, csv in zip(NODES, shares, strict=True)
        ]
        deployment.start_broker()
        deployment.start_repository()
        for node in nodes:
            node.result()
    for node_id in NODES:  # the script starts with them: nodes join during its discovery
        deployment.start_node(node_id)
    script_file = tmp_path / "experiment.py"
    script_file.write_text(script, encoding="utf-8")
    done = run_script(script_file, deployment.script_env())
    assert done.returncode == 0, f"the README's script failed:\n{done.stderr[-4000:]}"
    assert done.stdout.splitlines() == expected, done.stdout
    for node_id, child in deployment.nodes.items():
        assert child.wait_for_line("node ", 1) == f"node {node_id} online"
    final_sha256 = expected[-2].split("=", 1)[1]
    final_params = tmp_path / expected[-1].split("=", 1)[1]
    assert final_params.is_file() and final_params.name.startswith(final_sha256)
    # One line a round on stderr; both nodes answered every round and the final validation.
    rounds = [line for line in done.stderr.splitlines() if " replies " in line]
    assert len(rounds) == 11 and all(": 2 replies " in line for line in rounds), rounds

    # Run again, the script carries on from its run_dir: here, a finished job, same lines.
    again = run_script(script_file, deployment.script_env())
    assert again.returncode == 0, f"the README's script failed:\n{again.stderr[-4000:]}"
    assert again.stdout.splitlines() == expected, again.stdout
    assert not any(" replies " in line for line in again.stderr.splitlines()), again.stderr

    codes = deployment.stop()
    assert codes == {**dict.fromkeys(NODES, 0), "repository": 0}, codes
