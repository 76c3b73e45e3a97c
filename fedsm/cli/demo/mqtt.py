"""The demo across processes: an HTTP repository server and K node processes talking to a
real MQTT broker, the researcher in this process.

Each run has its own topic prefix (``<prefix>/demo-<tag>``, the tag derived from the run
directory) and researcher id, and its repository server its own bearer token; all three are
kept in ``RUN_DIR/mqtt.json`` (mode 0600) with the server's port, so a resume uses the same.
A run therefore never talks to another federation's nodes on a shared broker.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fedsm.cli.procs import Child, free_port
from fedsm.core.messages import BROADCAST, Reply, Request, TrainRequest
from fedsm.errors import ConfigurationError
from fedsm.repository import HttpRepository
from fedsm.transport import MqttBus, parse_broker_url

if TYPE_CHECKING:
    from fedsm.cli.demo.run import DemoConfig

__all__ = ["mqtt_world", "prepare_node_dir", "node_setup_missing", "run_settings"]

log = logging.getLogger(__name__)

#: The researcher id and topic prefix of runs made before each run had its own.
RESEARCHER_ID = "researcher-demo"
LEGACY_PREFIX = "fedsm"
START_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 120.0
#: On a deliberate stop, how long the nodes may take to finish the trainings they run.
DRAIN_TIMEOUT_S = 30.0
TAG = "breast-cancer"
SETTINGS_FILE = "mqtt.json"


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


def _run_tag(run_dir: Path) -> str:
    """The run's tag: derived from the directory where the run was made."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:12]


def run_settings(run_dir: Path, broker: str) -> dict[str, Any]:
    """The run's MQTT settings, chosen once per run and kept in ``mqtt.json`` (mode 0600):
    ``repository_port``, ``repository_token``, ``topic_prefix`` and ``researcher_id``.

    A run made before a setting existed gets it added: a new token; the old shared prefix and
    researcher id if its job has started (its log names them), its own ones otherwise.
    """
    from fedsm.cli.demo.run import (
        DemoFileError,
        log_has_records,
        read_json,
        write_json_atomic,
    )
    from fedsm.researcher.job import LOG_NAME

    settings_path = run_dir / SETTINGS_FILE
    remedy = (
        'It holds the run\'s repository server port and token, {"repository_port": PORT, '
        '"repository_token": TOKEN, "topic_prefix": PREFIX, "researcher_id": ID}: write the '
        "port back with the one in the job log's artifact URLs (`fedsm replay LOG`), or "
        "delete the file if the log names its artifacts by digest only"
    )
    started = log_has_records(run_dir / "researcher" / LOG_NAME)
    data: dict[str, Any] = {}
    try:
        data = read_json(settings_path, remedy)
        port = data.get("repository_port")
        if type(port) is not int or not 0 < port < 65536:
            raise DemoFileError(settings_path, f"has no valid repository_port ({port!r})", remedy)
    except FileNotFoundError:
        pass
    except DemoFileError as exc:
        if started:
            raise
        log.warning("%s; choosing a new port (the job has not started)", exc)
        data = {}
    wanted = dict(data)
    wanted.setdefault("repository_port", free_port())
    token = wanted.get("repository_token")
    if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
        wanted["repository_token"] = secrets.token_urlsafe(32)
    if not isinstance(wanted.get("topic_prefix"), str) or not isinstance(
        wanted.get("researcher_id"), str
    ):
        if started and data:  # a run of an older version: its log names the shared ones
            wanted["topic_prefix"], wanted["researcher_id"] = LEGACY_PREFIX, RESEARCHER_ID
        else:
            base = parse_broker_url(broker).get("topic_prefix", LEGACY_PREFIX)
            tag = _run_tag(run_dir)
            wanted["topic_prefix"] = f"{base}/demo-{tag}"
            wanted["researcher_id"] = f"{RESEARCHER_ID}-{tag}"
    private = stat.S_IMODE(settings_path.stat().st_mode) == 0o600 if data else False
    if wanted != data or not private:
        write_json_atomic(settings_path, wanted, mode=0o600)
    return wanted


def _repository_port(run_dir: Path) -> int:
    """The repository server's port, chosen once per run (see :func:`run_settings`)."""
    return int(run_settings(run_dir, "mqtt://127.0.0.1")["repository_port"])


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with its ``?prefix=`` set to ``prefix`` (other parameters kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    query.append(("prefix", prefix))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:")))


class _InFlight:
    """The train requests the researcher sent that no node has answered yet, so that a
    deliberate stop lets the nodes finish them (and their executors stop idle, cleanly)."""

    def __init__(self, bus: MqttBus) -> None:
        self._bus = bus
        self._pending: set[tuple[str, str]] = set()
        self._cond = threading.Condition()
        send, broadcast = bus.send, bus.broadcast

        def tracked_send(node_id: str, request: Request) -> None:
            self._add([node_id], request)
            send(node_id, request)

        def tracked_broadcast(request: Request) -> None:
            self._add(sorted(bus.online_nodes()), request)
            broadcast(request)

        bus.send = tracked_send  # type: ignore[method-assign]
        bus.broadcast = tracked_broadcast  # type: ignore[method-assign]
        bus.subscribe(self._on_message)

    def _add(self, node_ids: list[str], request: Request) -> None:
        if isinstance(request, TrainRequest):
            with self._cond:
                self._pending.update((n, request.request_id) for n in node_ids if n != BROADCAST)

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Reply):
            with self._cond:
                self._pending.discard((message.node_id, message.request_id))
                self._cond.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Until every train request sent is answered, its node is offline, or timeout."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                online = self._bus.online_nodes()
                self._pending = {p for p in self._pending if p[0] in online}
                remaining = end - time.monotonic()
                if not self._pending or remaining <= 0:
                    return
                self._cond.wait(min(remaining, 0.5))


@contextmanager
def mqtt_world(
    run_dir: Path,
    config: DemoConfig,
    files: dict[str, Any],
    *,
    say: Callable[[str], None] = print,
) -> Iterator[tuple[MqttBus, HttpRepository]]:
    """Start the repository server and the nodes, yield the researcher's bus and repository.

    On the way out (the job's end, an error or Ctrl-C) the nodes first finish the trainings
    they run (up to :data:`DRAIN_TIMEOUT_S`; a second Ctrl-C skips that), then every child
    is stopped with SIGTERM, by PID."""
    # A resumed run reuses the repository URL its log names, its topic prefix and ids.
    settings = run_settings(run_dir, config.broker)
    prefix, researcher_id = settings["topic_prefix"], settings["researcher_id"]
    token = settings["repository_token"]
    broker = with_prefix(config.broker, prefix)
    with ExitStack() as stack:
        # The researcher connects first: an unreachable broker is one clear error, before
        # any repository or node process is started.
        bus = MqttBus(researcher_id, "researcher", **parse_broker_url(broker))
        stack.callback(bus.close)
        inflight = _InFlight(bus)
        repo = Child(
            ["repo", "serve", "--root", str(run_dir / "repository")]
            + ["--port", str(settings["repository_port"])],
            name="repository server",
            env={"FEDSM_REPO_TOKEN": token},  # not on the command line, where ps shows it
        )
        stack.callback(repo.stop)
        url = repo.wait_for_line("repository=", START_TIMEOUT_S).split("=", 1)[1]
        repository = HttpRepository(url, token)
        node_ids = [f"node-{k}" for k in range(1, len(files["nodes"]) + 1)]
        node_dirs = [run_dir / "nodes" / node_id for node_id in node_ids]
        # Operators' set-up steps and node start-up are independent per node: run them side
        # by side (each is a python process importing torch).
        with ThreadPoolExecutor(max_workers=len(node_ids)) as pool:
            csvs = [Path(c) for c in files["nodes"]]
            plans = [Path(files["plan"])] * len(node_ids)
            list(pool.map(prepare_node_dir, node_dirs, node_ids, csvs, plans))
        children = []
        say(f"starting {len(node_ids)} node processes (topic prefix {prefix})")
        node_env = {"FEDSM_REPOSITORY_TOKEN": token}
        for node_id, node_dir in zip(node_ids, node_dirs, strict=True):
            args = ["node", "start", "--dir", str(node_dir), "--broker", broker]
            child = Child([*args, "--repo", url], name=node_id, env=node_env)
            stack.callback(child.stop)
            children.append(child)
        for k, (node_id, child) in enumerate(zip(node_ids, children, strict=True), 1):
            child.wait_for_line(f"node {node_id} online", START_TIMEOUT_S)
            say(f"{k}/{len(node_ids)} nodes online")
        bus.wait_online(node_ids, timeout_s=START_TIMEOUT_S)
        try:
            yield bus, repository
        except BaseException:
            # A deliberate stop (Ctrl-C) or a failure: let the nodes finish what they train,
            # so their executors stop idle rather than killing a training worker.
            try:
                inflight.wait(min(DRAIN_TIMEOUT_S, config.reply_deadline_s))
            except KeyboardInterrupt:  # asked twice: stop now
                pass
            raise
