"""The demo across processes: an HTTP repository server and K node processes talking to a
real MQTT broker, the researcher in this process."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.cli.procs import Child, free_port
from fedsm.errors import ConfigurationError
from fedsm.repository import HttpRepository
from fedsm.transport import MqttBus, parse_broker_url

if TYPE_CHECKING:
    from fedsm.cli.demo.run import DemoConfig

__all__ = ["mqtt_world", "prepare_node_dir", "node_setup_missing"]

log = logging.getLogger(__name__)

RESEARCHER_ID = "researcher-demo"
START_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 120.0
TAG = "breast-cancer"


def _dataset_id(node_id: str) -> str:
    return f"dataset-{node_id}"  # the id the memory world's nodes use too


def _dataset_name(node_id: str) -> str:
    return f"{TAG}-{node_id}"


def node_setup_missing(node_dir: Path, node_id: str, csv: Path, plan: Path) -> list[str]:
    """What set-up of ``node_dir`` still lacks, in order: any of ``init``, ``dataset`` (or
    ``dataset-moved``: registered, but at another path), ``approve``.

    Each step's own outcome is checked in the node's files (settings, registries), read in
    this process; nothing is changed, except that opening the node's database creates its
    tables if ``node init`` was cut short before it did.
    """
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.errors import NodeNotInitialised
    from fedsm.node.registry import ApprovalRegistry, DatasetRegistry
    from fedsm.node.settings import SETTINGS_FILE, load_settings

    settings_path = node_dir / SETTINGS_FILE
    try:
        settings = load_settings(node_dir, env={})
    except NodeNotInitialised:
        return ["init", "dataset", "approve"]
    except ConfigurationError as exc:
        if settings_path.is_file() and not settings_path.read_bytes().strip():
            # An empty node.toml: a write cut short (by an older version, or a crash
            # before the data reached the disk). The node never ran: initialise it again.
            return ["init", "dataset", "approve"]
        raise ConfigurationError(
            f"{node_dir} is not a usable node directory ({exc}); delete {node_dir} and "
            "rerun the demo to set the node up again"
        ) from None
    if settings.node_id != node_id:
        raise ConfigurationError(
            f"{settings_path} holds node {settings.node_id!r}, not {node_id!r}: this is not "
            "the demo's node; delete the directory or run the demo in a new one"
        )
    missing = []
    db = NodeDatabase(node_dir / DB_FILE)
    try:
        ours = [
            d
            for d in DatasetRegistry(db).list()
            if d["dataset_id"] == _dataset_id(node_id) or d["name"] == _dataset_name(node_id)
        ]
        if not ours:
            missing.append("dataset")
        elif any(Path(d["path"]) != Path(csv).resolve() for d in ours):
            missing.append("dataset-moved")
        if ApprovalRegistry(db).status_of_source(Path(plan).read_bytes()) != "approved":
            missing.append("approve")
    finally:
        db.close()
    return missing


def _step_args(step: str, node_dir: Path, node_id: str, csv: Path, plan: Path) -> list[list[str]]:
    """The operator's command lines that do ``step``."""
    d = ["--dir", str(node_dir)]
    add = [
        ["node", "dataset", "add", *d, "--name", _dataset_name(node_id), "--id"]
        + [_dataset_id(node_id), "--tags", TAG, "--type", "csv", "--path", str(csv)]
        + ["--target", "target"]
    ]
    if step == "init":
        # A node.toml left empty by a cut-short write is replaced (init refuses to overwrite).
        (node_dir / "node.toml").unlink(missing_ok=True)
        return [["node", "init", *d, "--id", node_id]]
    if step == "dataset":
        return add
    if step == "dataset-moved":  # the run directory moved: register the CSV where it is now
        from fedsm.node.database import DB_FILE, NodeDatabase
        from fedsm.node.registry import DatasetRegistry

        db = NodeDatabase(node_dir / DB_FILE)
        try:
            ids = [
                r["dataset_id"]
                for r in DatasetRegistry(db).list()
                if r["dataset_id"] == _dataset_id(node_id) or r["name"] == _dataset_name(node_id)
            ]
        finally:
            db.close()
        return [["node", "dataset", "remove", *d, i] for i in ids] + add
    if step == "approve":
        return [["node", "plan", "approve", *d, str(plan), "--by", "demo"]]
    raise ValueError(f"unknown set-up step {step!r}")


def _run_step(args: Sequence[str], node_id: str) -> None:
    """Run one ``fedsm node ...`` set-up command to its end."""
    child = Child(list(args), name=f"fedsm {' '.join(args[:3])} ({node_id})")
    try:
        code = child.proc.wait(timeout=STEP_TIMEOUT_S)
    finally:
        child.stop()
    if code != 0:
        raise RuntimeError(f"fedsm {' '.join(args)} failed with code {code}")


def prepare_node_dir(node_dir: Path, node_id: str, csv: Path, plan: Path) -> None:
    """Set up a node directory with its dataset and the approved plan, as an operator would,
    through the command line: each step that is not done yet (checked by its outcome, so a
    set-up killed at any point is finished by the next run, and a moved run directory gets
    its dataset registered at the new path)."""
    for step in node_setup_missing(node_dir, node_id, csv, plan):
        for args in _step_args(step, node_dir, node_id, csv, plan):
            _run_step(args, node_id)
    still = node_setup_missing(node_dir, node_id, csv, plan)
    if still:
        raise RuntimeError(f"setting up {node_dir} left {still} undone")


def _repository_port(run_dir: Path) -> int:
    """The repository server's port, chosen once per run and kept in ``mqtt.json``."""
    from fedsm.cli.demo.run import (
        DemoFileError,
        log_has_records,
        read_json,
        write_json_atomic,
    )
    from fedsm.researcher.job import LOG_NAME

    settings_path = run_dir / "mqtt.json"
    remedy = (
        'It holds the port of the run\'s repository server, {"repository_port": PORT}: write '
        "that back with the port in the job log's artifact URLs (`fedsm replay LOG`), or "
        "delete the file if the log names its artifacts by digest only"
    )
    try:
        data = read_json(settings_path, remedy)
        port = data.get("repository_port")
        if type(port) is not int or not 0 < port < 65536:
            raise DemoFileError(settings_path, f"has no valid repository_port ({port!r})", remedy)
        return port
    except FileNotFoundError:
        pass
    except DemoFileError as exc:
        if log_has_records(run_dir / "researcher" / LOG_NAME):
            raise
        log.warning("%s; choosing a new port (the job has not started)", exc)
    port = free_port()
    write_json_atomic(settings_path, {"repository_port": port})
    return port


@contextmanager
def mqtt_world(
    run_dir: Path, config: DemoConfig, files: dict[str, Any]
) -> Iterator[tuple[MqttBus, HttpRepository]]:
    """Start the repository server and the nodes, yield the researcher's bus and repository."""
    port = _repository_port(run_dir)  # a resumed run reuses the repository URL its log names
    with ExitStack() as stack:
        # The researcher connects first: an unreachable broker is one clear error, before
        # any repository or node process is started.
        bus = MqttBus(RESEARCHER_ID, "researcher", **parse_broker_url(config.broker))
        stack.callback(bus.close)
        repo = Child(
            ["repo", "serve", "--root", str(run_dir / "repository"), "--port", str(port)],
            name="repository server",
        )
        stack.callback(repo.stop)
        url = repo.wait_for_line("repository=", START_TIMEOUT_S).split("=", 1)[1]
        repository = HttpRepository(url)
        node_ids = [f"node-{k}" for k in range(1, len(files["nodes"]) + 1)]
        node_dirs = [run_dir / "nodes" / node_id for node_id in node_ids]
        # Operators' set-up steps and node start-up are independent per node: run them side
        # by side (each is a python process importing torch).
        with ThreadPoolExecutor(max_workers=len(node_ids)) as pool:
            csvs = [Path(c) for c in files["nodes"]]
            plans = [Path(files["plan"])] * len(node_ids)
            list(pool.map(prepare_node_dir, node_dirs, node_ids, csvs, plans))
        children = []
        for node_id, node_dir in zip(node_ids, node_dirs, strict=True):
            args = ["node", "start", "--dir", str(node_dir), "--broker", config.broker]
            child = Child([*args, "--repo", url], name=node_id)
            stack.callback(child.stop)
            children.append(child)
        for node_id, child in zip(node_ids, children, strict=True):
            child.wait_for_line(f"node {node_id} online", START_TIMEOUT_S)
        bus.wait_online(node_ids, timeout_s=START_TIMEOUT_S)
        yield bus, repository
