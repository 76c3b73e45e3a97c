"""``fedsm node``: what a hospital's operator runs next to the data.

``init`` makes a node directory; ``dataset`` and ``plan`` edit its registries (safe while the
node runs: sqlite in WAL mode; the listing commands open it read-only); plans are named by a
unique prefix of their sha256. ``config show`` prints the effective settings as TOML, secrets
masked; ``start`` runs the node on an MQTT broker and a file repository until SIGTERM or
Ctrl-C, then leaves the broker cleanly so researchers see it go offline. One ``start`` per
node directory (a lock names the PID that holds it); a start whose repository does not
answer, or whose bus stops for good, exits non-zero. ``witness`` lists and exports, signed with
the node's key, the researchers' log heads the node received (for an auditor to check the
job logs against).

Faults of the machine are one line and a non-zero exit, never a traceback: a registry locked
by another process past ``registry_busy_timeout_s`` (RegistryBusy: try again), a full or
read-only disk, a missing permission (NodeDirIOError, RegistryIOError).

A plan file with CRLF (or CR) line endings is refused by ``plan approve``/``reject`` unless
the operator says which plan it is: ``--normalise-newlines`` decides on its text with LF
newlines (what a job given the plan's class uploads, the digest ``fedsm plan hash
FILE:CLASS`` prints), ``--keep-newlines`` on its bytes as written (what a job given
``training_plan_path=FILE`` uploads, the digest of ``fedsm plan hash --verbatim``). The
error names both digests, so the operator can compare them with the one the researcher sent.
"""

from __future__ import annotations

import argparse
import errno
import functools
import getpass
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsm.cli.procs import signal_setter
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
    p.add_argument("digest", help="the plan's sha256 or a unique prefix of it")
    p.set_defaults(func=_plan_show)
    for action, status in (("approve", "approved"), ("reject", "rejected")):
        p = with_dir(
            plan_cmds.add_parser(
                action, help=f"{action} a plan: its file, or the digest (prefix) of one recorded"
            )
        )
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument(
            "plan",
            nargs="?",
            metavar="FILE|DIGEST",
            help="the plan's source file (as the researcher sent it), or a digest prefix",
        )
        target.add_argument("--sha256", metavar="DIGEST", help="a recorded plan's digest/prefix")
        newlines = p.add_mutually_exclusive_group()
        newlines.add_argument(
            "--normalise-newlines",
            action="store_true",
            help="a FILE with CRLF/CR line endings: decide on its text with LF newlines, as "
            "a job given the plan class uploads it (the digest of fedsm plan hash)",
        )
        newlines.add_argument(
            "--keep-newlines",
            action="store_true",
            help="a FILE with CRLF/CR line endings: decide on its bytes as written, as a job "
            "given training_plan_path=FILE uploads it (fedsm plan hash --verbatim)",
        )
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
    p.add_argument("--broker", help="mqtt://[user@]host:port (default: settings)")
    p.add_argument(
        "--broker-password-file",
        type=Path,
        metavar="FILE",
        help="read the broker password from FILE (or set FEDSM_BROKER_PASSWORD[_FILE])",
    )
    p.add_argument("--repo", help="repository URL or directory (default: settings)")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the repository token from FILE (or set FEDSM_REPOSITORY_TOKEN[_FILE])",
    )
    token.add_argument(
        "--token", help="repository token (visible to other users: prefer --token-file)"
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        metavar="SECONDS",
        help="exit non-zero when the broker stays unreachable this long "
        "(default: broker_give_up_s, 300)",
    )
    p.set_defaults(func=_start)

    for parser in _leaf_parsers(node):
        func = parser.get_default("func")
        if func is not None:
            parser.set_defaults(func=_registry_errors(func))


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser under ``parser`` that has no sub-commands."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_leaf_parsers(child) or [child])
    return found


def _registry_errors(func: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``func`` with sqlite's errors (a locked or damaged registry) and the machine's
    (:class:`OSError`: no space left, read-only file system, permission) as one clear line."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from fedsm.node.database import DB_FILE

        try:
            return func(args)
        except sqlite3.Error as exc:
            raise _sqlite_error(args.dir / DB_FILE, exc) from None
        except OSError as exc:
            raise _os_error(exc, args.dir) from None

    return run


#: errnos of a machine that can not keep the node's files: a NodeDirIOError whatever the file.
_IO_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EFBIG")
    if hasattr(errno, name)
)


def _os_error(exc: OSError, node_dir: Path) -> Exception:
    """An :class:`OSError` that escaped a command on ``node_dir``, as a one-line fedsm error."""
    from fedsm.node.errors import NodeError
    from fedsm.node.settings import NodeDirIOError

    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        return NodeDirIOError(f"could not read or write {exc.filename}: {reason}")
    if exc.errno in _IO_ERRNOS:
        return NodeDirIOError(
            f"could not read or write a file in the node directory {node_dir}: {reason}"
        )
    return NodeError(f"{type(exc).__name__}: {reason}")


def _sqlite_error(path: Path, exc: sqlite3.Error) -> Exception:
    """A sqlite error that escaped the registry, as a one-line fedsm error."""
    from fedsm.node.database import registry_fault
    from fedsm.node.witness import registry_error

    return registry_fault(path, exc) or registry_error(path, exc)


# --------------------------------------------------------------------------- helpers


def _warn(message: str) -> None:
    print(f"fedsm: warning: {message}", file=sys.stderr)


def _open(node_dir: Path) -> tuple[Any, Any]:
    """Settings and database of an initialised node directory."""
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.settings import load_settings

    settings = load_settings(node_dir)
    db = NodeDatabase(node_dir / DB_FILE, busy_timeout_s=settings.registry_busy_timeout_s)
    return settings, db


def _open_readonly(node_dir: Path) -> tuple[Any, Any]:
    """Settings and a read-only database of an initialised node directory."""
    from fedsm.node.database import DB_FILE, NodeDatabase
    from fedsm.node.settings import load_settings

    settings = load_settings(node_dir)
    path = node_dir / DB_FILE
    try:
        db = NodeDatabase(path, readonly=True, busy_timeout_s=settings.registry_busy_timeout_s)
    except sqlite3.Error as exc:
        raise _sqlite_error(path, exc) from None
    return settings, db


def _plans(settings: Any, db: Any) -> Any:
    """The approval registry of ``db`` with the node's limits."""
    from fedsm.node.registry import ApprovalRegistry

    return ApprovalRegistry(
        db, max_plan_bytes=settings.max_plan_bytes, max_pending_plans=settings.max_pending_plans
    )


def _witness_read(node_dir: Path, read: Any) -> Any:
    """``read(settings, WitnessStore)`` on the node's registry opened read-only; sqlite's
    errors (a locked or damaged file) become one clear line."""
    from fedsm.node.witness import WitnessStore

    settings, db = _open_readonly(node_dir)
    try:
        return read(settings, WitnessStore(db))
    except sqlite3.Error as exc:
        raise _sqlite_error(db.path, exc) from None
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
    from fedsm.node.settings import ENV_PREFIX, SETTINGS_FILE, load_settings, settings_toml

    settings = load_settings(args.dir)
    print(f"# {args.dir / SETTINGS_FILE}, with {ENV_PREFIX}* environment overrides applied")
    if not args.show_secrets:
        print('# secrets are masked ("***"); --show-secrets prints them')
    print(settings_toml(settings, show_secrets=args.show_secrets), end="")
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

    _, db = _open_readonly(args.dir)
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
    from fedsm.node.registry import short_digests

    settings, db = _open_readonly(args.dir)
    try:
        rows = [p.summary() for p in _plans(settings, db).list()]
    finally:
        db.close()
    if args.status:
        rows = [r for r in rows if r["status"] == args.status]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    short = short_digests([r["sha256"] for r in rows])
    for row in rows:
        row["digest"] = short[row["sha256"]]
        row["class"] = ",".join(row["plan_classes"]) or "(no plan class)"
    _print_table(rows, ["digest", "class", "status", "name", "decided_by", "decided_at"])
    return 0


def _plan_show(args: argparse.Namespace) -> int:
    settings, db = _open_readonly(args.dir)
    try:
        plans = _plans(settings, db)
        record = plans.get(plans.resolve(args.digest))
    finally:
        db.close()
    for key, value in record.summary().items():
        if key == "plan_classes":
            value = ", ".join(value) or "(none found: not a training plan?)"
        print(f"{key}: {value}")
    print("--- source ---")
    print(record.source.decode("utf-8", errors="replace"), end="")
    return 0


def _looks_like_digest(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)


#: Why a plan file with CR line endings can not be decided on as it is (see the module doc).
CR_NEWLINES_ERROR = (
    "{file} has CRLF (or CR) line endings, so which plan it is depends on how the job "
    "uploads it: a job given the plan class uploads it with LF newlines, sha256 {lf} (what "
    "`fedsm plan hash FILE:CLASS` prints); a job given training_plan_path=FILE uploads the "
    "bytes as written, sha256 {raw} (`fedsm plan hash --verbatim`). Compare with the digest "
    "the researcher sent, then run again with --normalise-newlines (to {action} {lf_short}) "
    "or --keep-newlines (to {action} {raw_short})"
)


def _newlines_chosen(file: Path, source: bytes, args: argparse.Namespace) -> bytes:
    """The bytes to decide on for a plan file: as read when it has no CR; else the operator's
    choice (--normalise-newlines / --keep-newlines), or a ConfigurationError naming both
    digests."""
    from fedsm.digests import sha256_hex

    if b"\r" not in source:
        return source
    normalised = source.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lf, raw = sha256_hex(normalised), sha256_hex(source)
    action = "approve" if args.status == "approved" else "reject"
    if args.normalise_newlines:
        _warn(
            f"{file} has CRLF/CR line endings: deciding on its text with LF newlines, sha256 "
            f"{lf} (its bytes as written are sha256 {raw})"
        )
        return normalised
    if args.keep_newlines:
        _warn(
            f"{file} has CRLF/CR line endings: deciding on its bytes as written, sha256 {raw} "
            f"(with LF newlines it would be sha256 {lf})"
        )
        return source
    raise ConfigurationError(
        CR_NEWLINES_ERROR.format(
            file=file, lf=lf, raw=raw, action=action, lf_short=lf[:12], raw_short=raw[:12]
        )
    )


def _plan_decide(args: argparse.Namespace) -> int:
    from fedsm.node.registry import plan_classes

    source = file = prefix = None
    if args.sha256 is not None:
        prefix = args.sha256
    elif Path(args.plan).is_file():
        file = Path(args.plan)
        try:
            source = file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read plan file {file}: {exc.strerror}") from None
    elif _looks_like_digest(args.plan):
        prefix = args.plan
    else:
        raise ConfigurationError(
            f"plan file {args.plan} does not exist (nor is it a digest prefix)"
        )
    if file is None and (args.normalise_newlines or args.keep_newlines):
        raise ConfigurationError(
            "--normalise-newlines and --keep-newlines choose how to read a plan FILE; "
            "a digest names one plan already"
        )
    if source is not None:
        assert file is not None
        source = _newlines_chosen(file, source, args)
        found = plan_classes(source)
        if found is None:
            _warn(f"{file} is not valid Python: is it the training plan the researcher sent?")
        elif not found:
            _warn(
                f"{file} defines no TorchTrainingPlan subclass (read, not run): is it the "
                "training plan the researcher sent?"
            )
    by = args.by or _login()
    settings, db = _open(args.dir)
    try:
        plans = _plans(settings, db)
        record = plans.decide(
            args.status,
            sha256=None if prefix is None else plans.resolve(prefix),
            source=source,
            name=args.name or (file.name if file is not None else None),
            by=by,
            notes=args.notes,
        )
    finally:
        db.close()
    classes = ", ".join(record.plan_classes or []) or "no plan class"
    print(f"{record.status} training plan {record.sha256} ({record.name}: {classes})")
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


def _broker_args(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """MQTT connection arguments: URL from ``--broker`` or the settings, password from
    ``--broker-password-file``, the URL, or the settings (their env / file), in that order."""
    from fedsm.node.settings import read_secret_file
    from fedsm.transport import parse_broker_url

    bus_args = parse_broker_url(args.broker or settings.broker_url)
    if args.broker and bus_args.get("password") is not None:
        _warn(
            "the broker password is on the command line, where other users can read it (ps); "
            "use --broker-password-file or FEDSM_BROKER_PASSWORD(_FILE) instead"
        )
    if bus_args.get("username") is None and settings.broker_username:
        bus_args["username"] = settings.broker_username
    if args.broker_password_file is not None:
        bus_args["password"] = read_secret_file(args.broker_password_file, "broker password")
    elif bus_args.get("password") is None and settings.broker_password:
        bus_args["password"] = settings.broker_password
    return bus_args


def _repository_token(args: argparse.Namespace, settings: Any) -> str | None:
    from fedsm.node.settings import read_secret_file

    if args.token_file is not None:
        return read_secret_file(args.token_file, "repository token")
    if args.token is not None:
        _warn(
            "the repository token is on the command line, where other users can read it "
            "(ps); use --token-file or FEDSM_REPOSITORY_TOKEN(_FILE) instead"
        )
        return args.token
    return settings.repository_token


def _start(args: argparse.Namespace) -> int:
    from fedsm.node.errors import NodeStartFailed
    from fedsm.node.service import NodeDirLock, check_repository
    from fedsm.node.settings import load_settings
    from fedsm.repository import open_repository

    settings = load_settings(args.dir)
    with NodeDirLock(args.dir):
        repo_url = args.repo or settings.repository_url
        if not (args.broker or settings.broker_url) or not repo_url:
            raise ConfigurationError(
                "fedsm node start needs a broker and a repository: pass --broker and --repo, "
                "or set broker_url / repository_url in node.toml (or FEDSM_BROKER_URL / "
                "FEDSM_REPOSITORY_URL)"
            )
        give_up_s = settings.broker_give_up_s if args.give_up_after is None else args.give_up_after
        if not give_up_s > 0:
            raise ConfigurationError("--give-up-after must be > 0 seconds")
        bus_args = _broker_args(args, settings)
        try:
            repository = open_repository(repo_url, token=_repository_token(args, settings))
        except OSError as exc:
            raise NodeStartFailed(f"cannot open the repository {repo_url}: {exc}") from None
        check_repository(repository, repo_url)
        reason = _serve(args.dir, settings, bus_args, repository, give_up_s)
        if reason is not None:
            raise NodeStartFailed(f"node {settings.node_id} stopped: {reason}")
    return 0


def _serve(
    node_dir: Path,
    settings: Any,
    bus_args: dict[str, Any],
    repository: Any,
    give_up_s: float,
) -> str | None:
    """Run the node until SIGTERM/SIGINT (return None) or its bus stops (return why)."""
    from fedsm.node.node import Node
    from fedsm.node.process_executor import ProcessTrainingExecutor
    from fedsm.node.service import watch_bus
    from fedsm.transport import MqttBus

    stop = threading.Event()

    on_signal = signal_setter(stop)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    executor = ProcessTrainingExecutor(time_limit_s=settings.training_time_limit_s)
    try:
        executor.start()  # the worker imports torch before we say we are online
        bus = MqttBus(settings.node_id, "node", **bus_args)
        node = Node(node_dir, bus=bus, repository=repository, settings=settings, executor=executor)
        try:
            node.start()
            print(f"node {settings.node_id} online", flush=True)
            reason = watch_bus(bus, stop, give_up_after_s=give_up_s)
        finally:
            node.stop()  # closes the bus: "offline" is published if it still can be
    finally:
        executor.close(wait=False)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"node {settings.node_id} offline", flush=True)
    return reason
