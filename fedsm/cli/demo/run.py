"""The main job: federated training on the bundled breast-cancer data, split across K nodes.

Everything of a demo run lives in one directory, so that it can be resumed, replayed and
audited::

    RUN_DIR/data/        train.csv, test.csv (held-out 20%), node-k.csv (each node's share)
    RUN_DIR/plan/        the training plan source every node approved (by sha256)
    RUN_DIR/repository/  the local file repository (the embedded default)
    RUN_DIR/nodes/       one directory per node: registry, approvals, reply cache
    RUN_DIR/researcher/  job.log and the job's files
    RUN_DIR/results.json the final lines, once the run has finished
    RUN_DIR/demo.json    the run's settings (a rerun uses them)
    RUN_DIR/local.json   the centralised baseline's accuracy (a cache)
    RUN_DIR/mqtt.json    ``--transport mqtt``: the repository server's port and token, the
                         run's topic prefix and researcher id (mode 0600)

Running the demo again on the same directory resumes an unfinished run, or prints a
finished run's results without training anything. A run can be killed at any point (while
splitting the data, setting up nodes, or anywhere in the job's log) and the directory moved:
rerunning the demo on it finishes what was left and ends on the same final parameters. The
JSON files are replaced atomically; the job's log decides whether the job resumes (it does
once the log holds a record).

Settings given again override the stored ones: a new broker, transport or reply deadline
replaces the stored one. The settings that define the job (nodes, rounds, seed, iid) can
change only while the job log holds no record (the data is split again); after that a
differing value is refused, naming the setting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedsm.data import breast_cancer_csv, partition_csv, split_holdout
from fedsm.errors import ConfigurationError
from fedsm.log import LogNotFound, scan
from fedsm.researcher.experiment import Experiment
from fedsm.researcher.job import LOG_NAME
from fedsm.training import runner
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.localjob import LocalJob

__all__ = [
    "DemoConfig",
    "DemoFileError",
    "DemoResult",
    "JOB_SETTINGS",
    "log_has_records",
    "prepare",
    "read_json",
    "run_demo",
    "write_json_atomic",
]

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


class DemoFileError(ConfigurationError):
    """A file of a demo run directory is empty, unreadable or not what this version wrote;
    the message names the file and what to do."""

    def __init__(self, path: Path, problem: str, remedy: str) -> None:
        super().__init__(f"{path}: {problem}. {remedy}")
        self.path, self.problem, self.remedy = Path(path), problem, remedy


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """Write ``obj`` as JSON to ``path`` so that a kill or crash leaves the old file or the new
    one, never a part: a temporary file in the same directory, fsync, rename, fsync the
    directory. The new file has permissions ``mode`` (0600 for a file holding a secret)."""
    path = Path(path)
    data = (json.dumps(obj, indent=1) + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a killed run could have other permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask left
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`DemoFileError` (with ``remedy``) if the file is
    empty, unreadable or not a JSON object. A missing file raises FileNotFoundError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DemoFileError(path, f"can not be read ({exc.strerror or exc})", remedy) from None
    if not data.strip():
        raise DemoFileError(path, "is empty (written by an older version or cut short)", remedy)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoFileError(path, f"is not valid JSON ({exc})", remedy) from None
    if not isinstance(obj, dict):
        raise DemoFileError(path, f"holds a {type(obj).__name__}, not a JSON object", remedy)
    return obj


def log_has_records(log_path: Path) -> bool:
    """Whether the job log at ``log_path`` holds at least one record (read-only).

    A missing log, or one with a header only (a run killed right after creating it), is a
    fresh start. A torn last record does not count; a damaged log raises its
    :class:`~fedsm.log.LogError` (the message says what to do).
    """
    try:
        return bool(scan(log_path).records)
    except LogNotFound:
        return False


#: The settings that define the job: fixed once the job log holds a record.
JOB_SETTINGS = ("nodes", "rounds", "seed", "iid", "aggregator")
#: The command-line flag of each setting, for messages.
FLAGS = {
    "nodes": "--nodes",
    "rounds": "--rounds",
    "seed": "--seed",
    "iid": "--iid/--label-skew",
    "transport": "--transport",
    "broker": "--broker",
    "reply_deadline_s": "--reply-deadline",
    "aggregator": "--aggregator",
}
#: A node share with fewer rows than this gets no validation rows (test_ratio 0.1).
MIN_SHARE_ROWS = 10


@dataclass(frozen=True)
class DemoConfig:
    """What a demo run is; stored in RUN_DIR/demo.json so a resume uses the same settings.

    Invalid values raise :class:`ConfigurationError` (one line naming the flag)."""

    nodes: int = 3
    rounds: int = 10
    seed: int = 0
    iid: bool = True
    transport: str = "memory"
    broker: str = "mqtt://127.0.0.1:1883"
    reply_deadline_s: float = 60.0
    aggregator: str = "fedavg"

    def __post_init__(self) -> None:
        from fedsm.transport import parse_broker_url

        for name in ("nodes", "rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"{FLAGS[name]} must be a whole number >= 1, not {value!r}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationError(f"--seed must be a whole number, not {self.seed!r}")
        if not isinstance(self.iid, bool):
            raise ConfigurationError(f"iid must be true or false, not {self.iid!r}")
        if self.transport not in ("memory", "mqtt"):
            raise ConfigurationError(f"--transport must be memory or mqtt, not {self.transport!r}")
        deadline = self.reply_deadline_s
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not math.isfinite(deadline)
            or deadline <= 0
        ):
            raise ConfigurationError(
                f"--reply-deadline must be a number of seconds > 0, not {deadline!r}"
            )
        if not isinstance(self.broker, str):
            raise ConfigurationError(f"--broker must be a URL, not {self.broker!r}")
        from fedsm.strategies.base import registered

        if self.aggregator not in registered():
            raise ConfigurationError(
                f"--aggregator must be one of {', '.join(registered())}, not {self.aggregator!r}"
            )
        try:
            parse_broker_url(self.broker)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--broker: {exc}") from None


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
    # Every file is written whole (temporary file and rename) and the split is deterministic,
    # so a split cut short by a kill is simply made again.
    node_csvs = [data_dir / f"node_{i}.csv" for i in range(config.nodes)]
    if not all(p.exists() for p in node_csvs):
        node_csvs = partition_csv(
            train_csv, config.nodes, data_dir, iid=config.iid, seed=config.seed
        )
    if not plan_path.exists():
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        BreastCancerPlan().save_code(plan_path)  # atomically
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
    try:
        return float(read_json(cache, "")["local_accuracy"])
    except FileNotFoundError:
        pass
    except (DemoFileError, KeyError, TypeError, ValueError) as exc:
        log.warning("recomputing the centralised baseline: %s", exc)
    args = dict(DEMO_TRAINING_ARGS)
    args["epochs"] = int(args.get("epochs", 1)) * config.rounds
    job = LocalJob(
        dataset_path=files["train"],
        training_plan_class=BreastCancerPlan,
        training_args=args,
        model_args=dict(DEMO_MODEL_ARGS),
        seed=config.seed,
        out_dir=run_dir / "local",
    )
    job.run()
    accuracy = _accuracy(files["plan"], job.params_path, files["test"])
    write_json_atomic(cache, {"local_accuracy": accuracy})
    return accuracy


def run_demo(
    run_dir: Path,
    config: DemoConfig,
    *,
    connect: Callable[..., Any] | None = None,
    say: Callable[[str], None] = print,
    given: Collection[str] | None = None,
) -> DemoResult:
    """Run (or resume, or re-print) the demo in ``run_dir``; return its results.

    ``given`` names the settings of ``config`` chosen by the caller (the flags on the command
    line); the others come from the run's stored settings, if any. None: all of them.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _load_or_store_config(run_dir, config, given)
    results = run_dir / "results.json"
    log_path = run_dir / "researcher" / LOG_NAME
    finished = _finished_result(results, run_dir, log_path)
    if finished is not None:
        say(f"{run_dir} holds a finished run; its results:")
        return finished
    files = prepare(run_dir, config)
    _warn_small_shares(files["nodes"], say)
    resuming = log_has_records(log_path)
    if config.transport == "memory":
        from fedsm.cli.demo.memory import memory_world as world
    elif config.transport == "mqtt":
        from fedsm.cli.demo.mqtt import mqtt_world as world
    else:
        raise ValueError(f"unknown transport {config.transport!r} (memory or mqtt)")

    def report(summary: Any) -> None:
        say(summary.line(config.rounds))

    # The memory world is one process: its log, repository and nodes survive the death of
    # that process (written to the OS, not fsynced), as a killed run needs to resume; the
    # MQTT world keeps every fsync.
    durability = "process" if config.transport == "memory" else "always"
    with world(run_dir, config, files, say=say) as (bus, repository):
        if resuming:
            say(f"resuming the unfinished run in {run_dir}")
            exp = Experiment.resume(
                run_dir / "researcher",
                bus=bus,
                repository=repository,
                on_round=report,
                durability=durability,
            )
        else:
            exp = Experiment(
                tags=TAGS,
                # the demo knows its hospitals: the search ends as soon as they all answered
                nodes=[f"node-{k}" for k in range(1, config.nodes + 1)],
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
                aggregator=config.aggregator,
                on_round=report,
                durability=durability,
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
    write_json_atomic(results, asdict(result))
    return result


def _finished_result(results: Path, run_dir: Path, log_path: Path) -> DemoResult | None:
    """The stored results of a finished run, or None. An unreadable results.json is a cache
    of what the log and the repository hold: it is recomputed (the finished job resumes to
    its end without training)."""
    try:
        stored = read_json(results, "")
        result = DemoResult(**stored)
    except FileNotFoundError:
        return None
    except (DemoFileError, TypeError) as exc:
        log.warning("%s is unreadable (%s); recomputing the results from the log", results, exc)
        return None
    # Paths as of now: the run directory may have been moved since it finished.
    return DemoResult(
        federated_accuracy=result.federated_accuracy,
        local_accuracy=result.local_accuracy,
        final_params_sha256=result.final_params_sha256,
        log=str(log_path),
        repository=str(run_dir / "repository"),
    )


def _warn_small_shares(node_csvs: list[Path], say: Callable[[str], None]) -> None:
    """Say so when a node's share is too small for the validation split of test_ratio."""
    ratio = float(DEMO_TRAINING_ARGS.get("test_ratio", 0.0))
    if ratio <= 0:
        return
    rows = []
    for path in node_csvs:
        with open(path, encoding="utf-8") as f:
            rows.append(max(sum(1 for line in f if line.strip()) - 1, 0))  # minus the header
    small = min(rows)
    if small < MIN_SHARE_ROWS:
        say(
            f"warning: the smallest node share has {small} rows: too few for a validation "
            f"split (test_ratio {ratio:g} of it is {small * ratio:.1f} rows); the global "
            "validation metrics are unreliable. Use fewer --nodes"
        )


def _load_or_store_config(
    run_dir: Path, config: DemoConfig, given: Collection[str] | None = None
) -> DemoConfig:
    """The run's settings: ``config`` on a new run; on an existing one the stored settings
    overridden by those in ``given`` (all of ``config``'s if None), stored again if changed.
    A job setting that differs once the job log holds a record is refused."""
    from fedsm.researcher.job import LOG_NAME

    stored = run_dir / "demo.json"
    remedy = (
        f"It holds this run's settings ({', '.join(f.name for f in fields(DemoConfig))}). "
        f"Write them back as a JSON object if you know them, or start the demo in a new "
        f"directory"
    )
    try:
        data = read_json(stored, remedy)
    except FileNotFoundError:
        write_json_atomic(stored, asdict(config))
        return config
    try:
        previous = DemoConfig(**data)
    except (TypeError, ConfigurationError) as exc:
        raise DemoFileError(stored, f"does not hold demo settings ({exc})", remedy) from None
    names = [f.name for f in fields(DemoConfig)] if given is None else list(given)
    wanted = {n: getattr(config, n) for n in names}
    changed = {n: v for n, v in wanted.items() if getattr(previous, n) != v}
    if not changed:
        return previous
    job_changes = [n for n in JOB_SETTINGS if n in changed]
    if job_changes:
        if log_has_records(run_dir / "researcher" / LOG_NAME):
            differs = ", ".join(
                f"{FLAGS[n]} {_show(changed[n])} (the run has {_show(getattr(previous, n))})"
                for n in job_changes
            )
            raise ConfigurationError(
                f"{run_dir} holds a started run with other settings: {differs}; drop the "
                "flag to resume it, or give a new --run-dir"
            )
        _forget_unstarted_run(run_dir)
    merged = DemoConfig(**{**asdict(previous), **changed})
    log.info("settings of %s changed: %s", run_dir, changed)
    write_json_atomic(stored, asdict(merged))
    return merged


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _forget_unstarted_run(run_dir: Path) -> None:
    """Remove what a run whose job never started made from its old job settings (the data
    split, the nodes, the job log header, the baseline), so that they are made again."""
    for name in ("data", "nodes", "researcher", "local"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "local.json").unlink(missing_ok=True)
