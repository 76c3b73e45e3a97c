"""``fedsm node``: what a hospital's operator runs next to the data.

``init`` makes a node directory; ``dataset`` and ``plan`` edit its registries (safe while the
node runs: sqlite in WAL mode); ``config show`` prints the effective settings; ``start`` runs
the node on an MQTT broker and a file repository until SIGTERM or Ctrl-C, then leaves the
broker cleanly so researchers see it go offline. ``witness`` lists and exports, signed with
the node's key, the researchers' log heads the node received (for an auditor to check the
job logs against).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fedsm.errors import ConfigurationError
from fedsm.node.database import PLAN_STATUSES


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``node`` command and its sub-commands to the ``fedsm`` parser."""
    node = sub.add_parser("node", help="run a node and manage its datasets and plan approvals")
    cmds = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)

    def with_dir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--dir", required=True, type=Path, help="the node directory")
        return parser

    p = with_dir(cmds.add_parser("init", help="create a node directory"))
    p.add_argument("--id", dest="node_id", help="node id (default: random node-<hex>)")
    p.set_defaults(func=_init)

    config = cmds.add_parser("config", help="node settings")
    config_cmds = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = with_dir(config_cmds.add_parser("show", help="print the effective settings"))
    p.add_argument("--show-secrets", action="store_true", help="do not mask passwords/tokens")
    p.set_defaults(func=_config_show)

    dataset = cmds.add_parser("dataset", help="datasets the node offers")
    ds_cmds = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = with_dir(ds_cmds.add_parser("add", help="register a dataset"))
    p.add_argument("--name", required=True)
    p.add_argument("--tags", required=True, help="comma-separated tags, e.g. a,b")
    p.add_argument("--type", dest="data_type", required=True, choices=("csv", "tensors"))
    p.add_argument("--path", required=True, type=Path)
    p.add_argument("--target", help="target column (csv)")
    p.add_argument("--description", default="")
    p.add_argument("--id", dest="dataset_id", help="dataset id (default: random)")
    p.set_defaults(func=_dataset_add)
    p = with_dir(ds_cmds.add_parser("list", help="list datasets"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_list)
    p = with_dir(ds_cmds.add_parser("remove", help="forget a dataset (its files stay)"))
    p.add_argument("dataset_id")
    p.set_defaults(func=_dataset_remove)

    plan = cmds.add_parser("plan", help="training plans and their approval")
    plan_cmds = plan.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    p = with_dir(plan_cmds.add_parser("list", help="list known plans"))
    p.add_argument("--status", choices=PLAN_STATUSES)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan_list)
    p = with_dir(plan_cmds.add_parser("show", help="print a plan's record and source"))
    p.add_argument("sha256")
    p.set_defaults(func=_plan_show)
    for action, status in (("approve", "approved"), ("reject", "rejected")):
        p = with_dir(plan_cmds.add_parser(action, help=f"{action} a plan (file or --sha256)"))
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("file", nargs="?", type=Path, help="the plan's source file")
        target.add_argument("--sha256", help="a plan the node already recorded")
        p.add_argument("--name", help="a name for the plan")
        p.add_argument("--notes", default="", help="why (kept with the decision)")
        p.add_argument("--by", help="who decides (default: the login name)")
        p.set_defaults(func=_plan_decide, status=status)

    witness = cmds.add_parser("witness", help="the researchers' log heads the node received")
    w_cmds = witness.add_subparsers(dest="witness_command", metavar="ACTION", required=True)
    p = with_dir(w_cmds.add_parser("list", help="jobs whose heads this node kept, highest seq"))
    p.set_defaults(func=_witness_list)
    p = with_dir(w_cmds.add_parser("export", help="write a job's signed witness file"))
    p.add_argument("--job", required=True, help="the job id")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the file to write (default: witness-<node_id>-<job_id>.json here)",
    )
    p.add_argument(
        "--researcher", metavar="ID", help="whose job, when two researchers used the same job id"
    )
    p.set_defaults(func=_witness_export)
    p = with_dir(w_cmds.add_parser("key", help="print the node's public key (hex Ed25519)"))
    p.set_defaults(func=_witness_key)

    p = with_dir(cmds.add_parser("start", help="run the node until SIGTERM/Ctrl-C"))
    p.add_argument("--broker", help="mqtt://[user[:pass]@]host:port (default: settings)")
    p.add_argument("--repo", help="repository URL or directory (default: settings)")
    p.add_argument("--token", help="repository bearer token (default: settings)")
    p.set_defaults(func=_start)


# --------------------------------------------------------------------------- helpers


def _open(node_dir: Path) -> tuple[Any, Any]:
    """Settings and database of an initialised node directory."""
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.settings import load_settings

    settings = load_settings(node_dir)
    return settings, NodeDatabase(node_dir / DB_FILE)


def _open_readonly(node_dir: Path) -> tuple[Any, Any]:
    """Settings and a read-only database of an initialised node directory."""
    import sqlite3

    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.settings import load_settings
    from fedsm.node.witness import registry_error

    settings = load_settings(node_dir)
    path = node_dir / DB_FILE
    try:
        return settings, NodeDatabase(path, readonly=True, busy_timeout_s=3.0)
    except sqlite3.Error as exc:
        raise registry_error(path, exc) from None


def _witness_read(node_dir: Path, read: Any) -> Any:
    """``read(settings, WitnessStore)`` on the node's registry opened read-only; sqlite's
    errors (a locked or damaged file) become one clear line."""
    import sqlite3

    from fedsm.node.witness import WitnessStore, registry_error

    settings, db = _open_readonly(node_dir)
    try:
        return read(settings, WitnessStore(db))
    except sqlite3.Error as exc:
        raise registry_error(db.path, exc) from None
    finally:
        db.close()


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------- commands


def _init(args: argparse.Namespace) -> int:
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.settings import init_node_dir
    from fedsm.node.witness import load_or_create_key, public_key_hex

    settings = init_node_dir(args.dir, args.node_id)
    NodeDatabase(args.dir / DB_FILE).close()
    key = public_key_hex(load_or_create_key(args.dir))
    print(f"initialised node {settings.node_id} in {args.dir}")
    print(f"witness public key: {key} (give it to your auditors)")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from fedsm.node.settings import ENV_PREFIX, SETTINGS_FILE, load_settings

    settings = load_settings(args.dir)
    print(f"# {args.dir / SETTINGS_FILE}, with {ENV_PREFIX}* environment overrides applied")
    for key, value in settings.to_dict(show_secrets=args.show_secrets).items():
        print(f"{key} = {json.dumps(value)}")
    return 0


def _dataset_add(args: argparse.Namespace) -> int:
    from fedsm.node.registry import DatasetRegistry

    if not args.path.exists():
        raise ConfigurationError(f"dataset path {args.path} does not exist")
    if args.data_type == "csv":
        if not args.target:
            raise ConfigurationError("a csv dataset needs --target COLUMN")
        from fedsm.training.datasets import describe_csv

        meta = describe_csv(args.path, args.target)
    else:
        from fedsm.training.datasets import describe_tensors

        meta = describe_tensors(args.path)
    _, db = _open(args.dir)
    try:
        record = DatasetRegistry(db).add(
            name=args.name,
            tags=args.tags.split(","),
            data_type=args.data_type,
            path=args.path,
            target=args.target,
            shape=meta["shape"],
            dtypes=meta["dtypes"],
            columns=meta.get("columns", ()),
            sample_count=meta["sample_count"],
            description=args.description,
            dataset_id=args.dataset_id,
        )
    finally:
        db.close()
    print(
        f"added dataset {record['dataset_id']} ({record['sample_count']} samples, "
        f"shape {record['shape']})"
    )
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    from fedsm.node.registry import DatasetRegistry

    _, db = _open(args.dir)
    try:
        rows = DatasetRegistry(db).list()
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["tags"] = ",".join(row["tags"])
    _print_table(rows, ["dataset_id", "name", "tags", "data_type", "sample_count", "path"])
    return 0


def _dataset_remove(args: argparse.Namespace) -> int:
    from fedsm.node.registry import DatasetRegistry

    _, db = _open(args.dir)
    try:
        DatasetRegistry(db).remove(args.dataset_id)
    finally:
        db.close()
    print(f"removed dataset {args.dataset_id}")
    return 0


def _plan_list(args: argparse.Namespace) -> int:
    from fedsm.node.registry import ApprovalRegistry

    _, db = _open(args.dir)
    try:
        rows = [p.summary() for p in ApprovalRegistry(db).list()]
    finally:
        db.close()
    if args.status:
        rows = [r for r in rows if r["status"] == args.status]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(rows, ["sha256", "status", "name", "decided_by", "decided_at", "first_seen"])
    return 0


def _plan_show(args: argparse.Namespace) -> int:
    from fedsm.node.registry import ApprovalRegistry

    _, db = _open(args.dir)
    try:
        record = ApprovalRegistry(db).get(args.sha256)
    finally:
        db.close()
    for key, value in record.summary().items():
        print(f"{key}: {value}")
    print("--- source ---")
    print(record.source.decode("utf-8", errors="replace"), end="")
    return 0


def _plan_decide(args: argparse.Namespace) -> int:
    from fedsm.node.registry import ApprovalRegistry

    source = None
    if args.file is not None:
        if not args.file.is_file():
            raise ConfigurationError(f"plan file {args.file} does not exist")
        source = args.file.read_bytes()
    by = args.by or _login()
    _, db = _open(args.dir)
    try:
        record = ApprovalRegistry(db).decide(
            args.status,
            sha256=args.sha256,
            source=source,
            name=args.name or (args.file.name if args.file else None),
            by=by,
            notes=args.notes,
        )
    finally:
        db.close()
    print(f"{record.status} training plan {record.sha256} ({record.name})")
    return 0


def _witness_list(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    jobs = _witness_read(args.dir, lambda settings, store: store.jobs())
    rows = [
        {
            "job_id": j.job_id,
            "researcher": j.researcher_id,
            "heads": j.heads,
            "highest_seq": j.highest_seq,
            "last_received": datetime.fromtimestamp(j.last_received_at, timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        for j in jobs
    ]
    _print_table(rows, ["job_id", "researcher", "heads", "highest_seq", "last_received"])
    return 0


def _witness_export(args: argparse.Namespace) -> int:
    from fedsm.core.witness import encode_witness
    from fedsm.node.witness import load_or_create_key, sign

    unsigned = _witness_read(
        args.dir,
        lambda settings, store: store.witness_file(settings.node_id, args.job, args.researcher),
    )
    signed = sign(unsigned, load_or_create_key(args.dir))
    out = args.out or Path(f"witness-{unsigned.node_id}-{args.job}.json")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(encode_witness(signed))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigurationError(f"could not write {out}: {exc}") from None
    print(out)
    return 0


def _witness_key(args: argparse.Namespace) -> int:
    from fedsm.node.settings import load_settings
    from fedsm.node.witness import load_or_create_key, public_key_hex

    load_settings(args.dir)  # an initialised node directory, not any directory
    print(public_key_hex(load_or_create_key(args.dir)))
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return f"uid-{os.getuid()}"


def _start(args: argparse.Namespace) -> int:
    from fedsm.node.node import Node
    from fedsm.node.process_executor import ProcessTrainingExecutor
    from fedsm.node.settings import load_settings
    from fedsm.repository import open_repository
    from fedsm.transport import MqttBus, parse_broker_url

    settings = load_settings(args.dir)
    broker_url = args.broker or settings.broker_url
    repo_url = args.repo or settings.repository_url
    if not broker_url or not repo_url:
        raise ConfigurationError(
            "fedsm node start needs a broker and a repository: pass --broker and --repo, or "
            "set broker_url / repository_url in node.toml (or FEDSM_BROKER_URL / "
            "FEDSM_REPOSITORY_URL)"
        )
    bus_args = parse_broker_url(broker_url)
    if bus_args.get("username") is None and settings.broker_username:
        bus_args["username"] = settings.broker_username
    if bus_args.get("password") is None and settings.broker_password:
        bus_args["password"] = settings.broker_password
    repository = open_repository(repo_url, token=args.token or settings.repository_token)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    executor = ProcessTrainingExecutor(time_limit_s=settings.training_time_limit_s)
    try:
        executor.start()  # the worker imports torch before we say we are online
        bus = MqttBus(settings.node_id, "node", **bus_args)
        node = Node(args.dir, bus=bus, repository=repository, settings=settings, executor=executor)
        try:
            node.start()
            print(f"node {settings.node_id} online", flush=True)
            while not stop.wait(3600):
                pass
        finally:
            node.stop()  # closes the bus: "offline" is published
    finally:
        executor.close(wait=False)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"node {settings.node_id} offline", flush=True)
    return 0
