"""The main job: federated training on the bundled breast-cancer data, split across K nodes.

Everything of a demo run lives in one directory, so that it can be resumed, replayed and
audited::

    RUN_DIR/data/        train.csv, test.csv (held-out 20%), node-k.csv (each node's share)
    RUN_DIR/plan/        the training plan source every node approved (by sha256)
    RUN_DIR/repository/  the local file repository (the embedded default)
    RUN_DIR/nodes/       one directory per node: registry, approvals, reply cache
    RUN_DIR/researcher/  job.log and the job's files
    RUN_DIR/results.json the final lines, once the run has finished

Running the demo again on the same directory resumes an unfinished run, or prints a
finished run's results without training anything.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsm.data import breast_cancer_csv, partition_csv, split_holdout
from fedsm.researcher.experiment import Experiment
from fedsm.researcher.job import LOG_NAME
from fedsm.training import runner
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.localjob import LocalJob

__all__ = ["DemoConfig", "DemoResult", "prepare", "run_demo"]

log = logging.getLogger(__name__)

TAGS = ("breast-cancer",)
#: Per round; the centralised baseline trains for as many epochs in all as the federation.
DEMO_TRAINING_ARGS = {
    "lr": 0.5,
    "epochs": 3,
    "batch_size": 32,
    # Each node validates the global model on a fixed 10% of its data before training.
    "test_ratio": 0.1,
    "test_on_global_updates": True,
    "random_seed": 0,
}
DEMO_MODEL_ARGS: dict[str, Any] = {}
PLAN_CLASS = "BreastCancerPlan"


@dataclass(frozen=True)
class DemoConfig:
    """What a demo run is; stored in RUN_DIR/demo.json so a resume uses the same settings."""

    nodes: int = 3
    rounds: int = 10
    seed: int = 0
    iid: bool = True
    transport: str = "memory"
    broker: str = "mqtt://127.0.0.1:1883"
    reply_deadline_s: float = 60.0


@dataclass(frozen=True)
class DemoResult:
    federated_accuracy: float
    local_accuracy: float
    final_params_sha256: str
    log: str
    repository: str

    def lines(self) -> list[str]:
        """The closing lines, for scripts."""
        return [
            f"federated_accuracy={self.federated_accuracy:.4f}",
            f"local_accuracy={self.local_accuracy:.4f}",
            f"final_params_sha256={self.final_params_sha256}",
            f"log={self.log}",
            f"repository={self.repository}",
        ]


def prepare(run_dir: Path, config: DemoConfig) -> dict[str, Any]:
    """Split the data and write the plan file (idempotent: an existing split is kept)."""
    data_dir = run_dir / "data"
    plan_path = run_dir / "plan" / "breast_cancer_plan.py"
    train_csv, test_csv = data_dir / "train.csv", data_dir / "test.csv"
    if not test_csv.exists():
        train_csv, test_csv = split_holdout(
            breast_cancer_csv(), data_dir, fraction=0.2, seed=config.seed
        )
    node_csvs = sorted(data_dir.glob("node-*.csv"))
    if len(node_csvs) != config.nodes:
        node_csvs = partition_csv(
            train_csv, config.nodes, data_dir, iid=config.iid, seed=config.seed
        )
    if not plan_path.exists():
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        BreastCancerPlan().save_code(plan_path)
    return {"train": train_csv, "test": test_csv, "nodes": node_csvs, "plan": plan_path}


def _accuracy(plan_path: Path, params_path: Path, test_csv: Path) -> float:
    metrics = runner.evaluate(
        plan_source=plan_path.read_text(encoding="utf-8"),
        plan_class=PLAN_CLASS,
        model_args=dict(DEMO_MODEL_ARGS),
        training_args=dict(DEMO_TRAINING_ARGS),
        params_path=params_path,
        dataset={
            "data_type": "csv",
            "path": str(test_csv),
            "target": "target",
            "dataset_id": "holdout",
        },
    )
    return float(metrics["accuracy"])


def local_baseline(run_dir: Path, files: dict[str, Any], config: DemoConfig) -> float:
    """Accuracy of the centralised baseline (LocalJob on the pooled training data), cached."""
    cache = run_dir / "local.json"
    if cache.exists():
        return float(json.loads(cache.read_text())["local_accuracy"])
    args = dict(DEMO_TRAINING_ARGS)
    args["epochs"] = int(args.get("epochs", 1)) * config.rounds
    job = LocalJob(
        files["train"],
        BreastCancerPlan,
        args,
        dict(DEMO_MODEL_ARGS),
        seed=config.seed,
        out_dir=run_dir / "local",
    )
    job.run()
    accuracy = _accuracy(files["plan"], job.params_path, files["test"])
    cache.write_text(json.dumps({"local_accuracy": accuracy}))
    return accuracy


def run_demo(
    run_dir: Path,
    config: DemoConfig,
    *,
    connect: Callable[..., Any] | None = None,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Run (or resume, or re-print) the demo in ``run_dir``; return its results."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _load_or_store_config(run_dir, config)
    results = run_dir / "results.json"
    if results.exists():
        say(f"{run_dir} holds a finished run; its results:")
        return DemoResult(**json.loads(results.read_text()))
    files = prepare(run_dir, config)
    log_path = run_dir / "researcher" / LOG_NAME
    resuming = log_path.exists() and log_path.stat().st_size > 0
    if config.transport == "memory":
        from fedsm.cli.demo.memory import memory_world as world
    elif config.transport == "mqtt":
        from fedsm.cli.demo.mqtt import mqtt_world as world
    else:
        raise ValueError(f"unknown transport {config.transport!r} (memory or mqtt)")

    def report(summary: Any) -> None:
        say(summary.line(config.rounds))

    with world(run_dir, config, files) as (bus, repository):
        if resuming:
            say(f"resuming the unfinished run in {run_dir}")
            exp = Experiment.resume(
                run_dir / "researcher", bus=bus, repository=repository, on_round=report
            )
        else:
            exp = Experiment(
                tags=TAGS,
                training_plan_class=PLAN_CLASS,
                training_plan_path=files["plan"],
                training_args=dict(DEMO_TRAINING_ARGS),
                model_args=dict(DEMO_MODEL_ARGS),
                round_limit=config.rounds,
                run_dir=run_dir / "researcher",
                bus=bus,
                repository=repository,
                seed=config.seed,
                reply_deadline_s=config.reply_deadline_s,
                on_round=report,
            )
        try:
            final_sha256 = exp.run()
            params = exp.final_params_path()
        finally:
            exp.close()
    result = DemoResult(
        federated_accuracy=_accuracy(files["plan"], params, files["test"]),
        local_accuracy=local_baseline(run_dir, files, config),
        final_params_sha256=final_sha256,
        log=str(log_path),
        # The directory, not the server's URL: it outlives the run's repository server and
        # `fedsm replay --verify --repo DIR` reads it directly (same content-addressed layout).
        repository=str(run_dir / "repository"),
    )
    tmp = results.with_suffix(".tmp")  # atomic: a kill here must not leave half a file
    tmp.write_text(json.dumps(asdict(result), indent=1))
    os.replace(tmp, results)
    return result


def _load_or_store_config(run_dir: Path, config: DemoConfig) -> DemoConfig:
    stored = run_dir / "demo.json"
    if stored.exists():
        previous = DemoConfig(**json.loads(stored.read_text()))
        if previous != config:
            log.warning("using the settings stored in %s for this run: %s", stored, previous)
        return previous
    stored.write_text(json.dumps(asdict(config), indent=1))
    return config
