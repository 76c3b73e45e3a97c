"""``fedsm plan ...``: training plans as a researcher sees them.

``fedsm plan hash FILE.py:CLASS`` or ``fedsm plan hash package.module:CLASS`` prints the
sha256 nodes will be asked to approve for that plan: the class is imported, its source made
by fedsm.researcher.plansource.plan_source (the function a Job uses) and hashed as the Job
writes it (UTF-8 bytes). ``--out FILE`` also writes those bytes, the file a node operator
approves with ``fedsm node plan approve FILE``. ``--verbatim`` hashes a file as
``Job(training_plan_path=FILE, training_plan_class=CLASS)`` uploads it: the whole file, as
written.

Newlines: a class's source always has LF newlines (Python reads source files with universal
newlines), whatever the file's; ``--verbatim`` keeps the file's bytes, CRLF included, and
says so on stderr, since the operator must then approve the file with ``fedsm node plan
approve --keep-newlines FILE`` (``--normalise-newlines`` approves the LF text instead).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsm.errors import ConfigurationError

_COUNTER = itertools.count(1)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command and its actions to the ``fedsm`` parser."""
    plan = sub.add_parser("plan", help="training plans as nodes will see them")
    cmds = plan.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    p = cmds.add_parser(
        "hash",
        help="print the sha256 nodes will be asked to approve for a plan",
        description=(
            "Print the sha256 of the plan source a job uploads for this plan, the digest a "
            "node operator approves. PLAN is path/to/file.py:ClassName or "
            "package.module:ClassName (imported with the current directory on the path)."
        ),
    )
    p.add_argument("plan", metavar="PLAN", help="FILE.py:CLASS or MODULE:CLASS")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="also write the exact source there (for fedsm node plan approve FILE)",
    )
    p.add_argument(
        "--verbatim",
        action="store_true",
        help=(
            "hash FILE as written, as a job given training_plan_path=FILE uploads it "
            "(default: the class's source, as a job given the class uploads it)"
        ),
    )
    p.set_defaults(func=_hash)


def _split(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigurationError(
            f"plan {spec!r}: give path/to/file.py:ClassName or package.module:ClassName"
        )
    if not name.isidentifier():
        raise ConfigurationError(f"plan {spec!r}: {name!r} is not a class name")
    return where, name


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where or Path(where).is_file()


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` for the block, as ``python script.py`` has it."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path) -> Any:
    """Import ``path`` as a module of its own (registered, so ``inspect`` reads its source)."""
    name = path.stem if path.stem.isidentifier() else "plan"
    if name in sys.modules:
        name = f"_fedsm_plan_hash_{next(_COUNTER)}_{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"plan file {path} can not be imported (not a Python file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ConfigurationError(f"plan file {path} does not import: {_one_line(exc)}") from None
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ConfigurationError(f"module {name} does not import: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _plan_class(module: Any, class_name: str, where: str) -> type:
    from fedsm.training.plan import TorchTrainingPlan

    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigurationError(f"{where} defines no {class_name}")
    if not (inspect.isclass(cls) and issubclass(cls, TorchTrainingPlan)):
        what = "another class" if inspect.isclass(cls) else f"a {type(cls).__name__}"
        raise ConfigurationError(
            f"{where}:{class_name} is not a TorchTrainingPlan subclass (it is {what})"
        )
    return cls


def _verbatim_source(path: Path, class_name: str) -> str:
    from fedsm.researcher.plansource import plan_source
    from fedsm.training.loader import PlanImportError, loaded_plan_class

    source, _ = plan_source(class_name, path)
    try:
        with loaded_plan_class(source, class_name):
            pass
    except PlanImportError as exc:
        raise ConfigurationError(f"plan file {path}: {exc}") from None
    return source


def hash_plan(spec: str, *, verbatim: bool = False) -> tuple[str, bytes]:
    """The plan's class name and the exact bytes a Job uploads for ``spec``.

    Raises
    ------
    ConfigurationError
        A bad spec, a missing file, a module that does not import, a class that is missing
        or not a TorchTrainingPlan.
    JobError, PlanError
        The class's source can not be read, or does not import on its own.
    """

    where, class_name = _split(spec)
    # Whatever the plan's module prints on import goes to stderr: stdout is the digest alone.
    with contextlib.redirect_stdout(sys.stderr):
        return _hash_plan(where, class_name, verbatim)


def _hash_plan(where: str, class_name: str, verbatim: bool) -> tuple[str, bytes]:
    from fedsm.researcher.plansource import plan_source

    if _is_file_spec(where):
        path = Path(where)
        if not path.is_file():
            raise ConfigurationError(f"plan file {path} does not exist")
        if verbatim:
            return class_name, _verbatim_source(path, class_name).encode("utf-8")
        with _on_path(path.resolve().parent):
            cls = _plan_class(_import_file(path), class_name, str(path))
            source, name = plan_source(cls, None)
    else:
        if verbatim:
            raise ConfigurationError("--verbatim hashes a file: give path/to/file.py:ClassName")
        with _on_path(Path.cwd()):
            cls = _plan_class(_import_module(where), class_name, where)
            source, name = plan_source(cls, None)
    return name, source.encode("utf-8")  # the bytes the Job writes and nodes hash


def _hash(args: argparse.Namespace) -> int:
    from fedsm.digests import sha256_hex

    _, data = hash_plan(args.plan, verbatim=args.verbatim)
    if b"\r" in data:  # only --verbatim keeps a file's CRs
        print(
            "fedsm: note: the file has CRLF (or CR) line endings and a job given "
            "training_plan_path uploads them as written; this digest is of those bytes. A "
            "node operator approves the file with `fedsm node plan approve --keep-newlines`.",
            file=sys.stderr,
        )
    if args.out is not None:
        try:
            args.out.write_bytes(data)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(sha256_hex(data))
    return 0
