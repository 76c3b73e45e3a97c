"""The demo across processes: an HTTP repository server and K node processes talking to a
real MQTT broker, the researcher in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.cli.procs import Child, free_port
from fedsm.repository import HttpRepository
from fedsm.transport import MqttBus, parse_broker_url

if TYPE_CHECKING:
    from fedsm.cli.demo.run import DemoConfig

__all__ = ["mqtt_world", "prepare_node_dir"]

RESEARCHER_ID = "researcher-demo"
START_TIMEOUT_S = 60.0


def prepare_node_dir(node_dir: Path, node_id: str, csv: Path, plan: Path) -> None:
    """Initialise a node directory with its dataset and the approved plan, as an operator would,
    through the command line. Skipped when the directory is already set up."""
    if (node_dir / "node.toml").exists():
        return
    steps = [
        ["node", "init", "--dir", str(node_dir), "--id", node_id],
        [
            "node",
            "dataset",
            "add",
            "--dir",
            str(node_dir),
            "--name",
            f"breast-cancer-{node_id}",
            "--tags",
            "breast-cancer",
            "--type",
            "csv",
            "--path",
            str(csv),
            "--target",
            "target",
        ],
        ["node", "plan", "approve", "--dir", str(node_dir), str(plan)],
    ]
    for args in steps:
        child = Child(args, name=f"fedsm {' '.join(args[:3])}")
        if child.proc.wait(timeout=120) != 0:
            raise RuntimeError(f"fedsm {' '.join(args)} failed with code {child.proc.returncode}")


@contextmanager
def mqtt_world(
    run_dir: Path, config: DemoConfig, files: dict[str, Any]
) -> Iterator[tuple[MqttBus, HttpRepository]]:
    """Start the repository server and the nodes, yield the researcher's bus and repository."""
    settings_path = run_dir / "mqtt.json"
    if settings_path.exists():  # a resumed run reuses the repository URL its log names
        port = int(json.loads(settings_path.read_text())["repository_port"])
    else:
        port = free_port()
        settings_path.write_text(json.dumps({"repository_port": port}))
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
