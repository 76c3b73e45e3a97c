"""The layer rules of the package, checked on the source (AST), not by importing it.

Layers, dependencies pointing down only::

    cli  >  audit  >  researcher  >  core  <  log
    node, transport, repository, training, strategies      errors, digests (root)

fedsm.testing sits beside cli: it may import every layer but cli (cli may import it).

Every ``fedsm/**/*.py`` is parsed and every import collected: module level, inside functions
and ``if TYPE_CHECKING:`` blocks, ``importlib.import_module("fedsm...")`` with a literal, and
the module names of a lazy package's ``_LAZY``-style table (a package ``__init__`` that calls
``import_module`` on a variable). ``from pkg import name`` through a package ``__init__`` is
also resolved to the module the name really comes from, and the rules apply to both.

Each failure names ``file:line`` and the import. Rules:

* core is pure: it imports only fedsm.core, fedsm.errors, the pure functions of fedsm.digests,
  the pure part of the standard library (:data:`PURE_STDLIB`; no os, io, sys, time, ...)
  and msgpack, transitions. Imports under ``if TYPE_CHECKING:`` never run and are exempt
  from the standard-library rule only.
* log imports only log, core, errors, digests, the standard library and core's libraries.
* errors and digests (importable by every layer) import no other fedsm module but errors,
  and only the pure standard library.
* who may import whom: :data:`FORBIDDEN`.
* no re-exports: ``from M import n`` needs ``n`` defined in ``M`` (a top-level def, class or
  assignment) or ``M.n`` to be a module; only a package ``__init__`` declaring ``__all__``
  may hand on names it imported, and only those in its ``__all__``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedsm"

#: Standard-library modules the pure core may use: no file, network, clock, randomness,
#: process or thread access. Extend only with a module that does no I/O.
PURE_STDLIB = frozenset(
    {
        "__future__",
        "abc",
        "base64",
        "binascii",
        "bisect",
        "collections",
        "contextlib",
        "copy",
        "dataclasses",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "hashlib",
        "heapq",
        "hmac",
        "itertools",
        "json",
        "keyword",
        "math",
        "numbers",
        "operator",
        "re",
        "string",
        "struct",
        "types",
        "typing",
        "unicodedata",
        "weakref",
        "zlib",
    }
)
#: Third-party libraries the core (and so the log) may use.
CORE_LIBRARIES = frozenset({"msgpack", "transitions", "typing_extensions"})
#: What core may take from fedsm.digests: the functions that do no I/O.
PURE_DIGESTS = frozenset({"sha256_hex", "is_sha256", "keyed_sha256_hex"})
#: Package __init__ files the layout says declare __all__ (so may hand on names).
PUBLIC_PACKAGES = (
    "fedsm",
    "fedsm.log",
    "fedsm.transport",
    "fedsm.repository",
    "fedsm.node",
    "fedsm.training",
    "fedsm.strategies",
)

#: (importer layer, imported layer): forbidden. A layer is a package prefix.
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("fedsm.audit", "fedsm.researcher"),
    ("fedsm.audit", "fedsm.transport"),
    ("fedsm.audit", "fedsm.node"),
    *(
        (low, high)
        for low in ("fedsm.node", "fedsm.transport", "fedsm.repository", "fedsm.training")
        for high in ("fedsm.researcher", "fedsm.audit", "fedsm.log", "fedsm.cli")
    ),
    *(
        (low, high)
        for low in ("fedsm.transport", "fedsm.repository")
        for high in ("fedsm.node", "fedsm.training")
    ),
)

#: The root package is the public facade over every layer, and ``python -m fedsm`` is the
#: command line: neither is below anything.
FACADES = frozenset({"fedsm", "fedsm.__main__"})


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Import:
    """One import of ``module`` (and, for ``from module import name``, of ``name``)."""

    path: Path
    line: int
    module: str
    name: str | None = None  # from module import name
    text: str = ""  # how it reads in the source
    type_checking: bool = False  # under `if TYPE_CHECKING:` (never runs)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: `{self.text}`"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    defines: frozenset[str]
    all: frozenset[str] | None  # __all__ as a literal, if any
    imports: list[Import]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements, looking into if/try/with blocks (still module level)."""
    out: list[ast.stmt] = []
    for stmt in body:
        out.append(stmt)
        if isinstance(stmt, ast.If):
            out += _top_level_statements(stmt.body) + _top_level_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            blocks = [stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)]
            for block in blocks:
                out += _top_level_statements(block)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            out += _top_level_statements(stmt.body)
    return out


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(elt)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def defined_names(tree: ast.Module) -> frozenset[str]:
    """Names a module defines itself: top-level def, class and assignment (not imports)."""
    names: set[str] = set()
    for stmt in _top_level_statements(tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                names.update(_target_names(target))
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and (
            not isinstance(stmt, ast.AnnAssign) or stmt.value is not None
        ):
            names.update(_target_names(stmt.target))
    return frozenset(names)


def declared_all(tree: ast.Module) -> frozenset[str] | None:
    """The literal strings of ``__all__`` (assignments and ``+=``), or None without one."""
    found = False
    names: set[str] = set()
    for stmt in _top_level_statements(tree.body):
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
            targets = [stmt.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            found = True
            value = stmt.value
            if value is not None:
                names.update(
                    node.value
                    for node in ast.walk(value)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)
                )
                # __all__ = sorted(_LAZY): the keys of that table
                for node in ast.walk(value):
                    if isinstance(node, ast.Name) and node.id != "sorted":
                        names.update(_dict_literal_keys(tree, node.id))
    return frozenset(names) if found else None


def _dict_literal(tree: ast.Module, name: str) -> ast.Dict | None:
    for stmt in tree.body:
        value = None
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in stmt.targets
        ):
            value = stmt.value
        elif (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and stmt.target.id == name
        ):
            value = stmt.value
        if isinstance(value, ast.Dict):
            return value
    return None


def _dict_literal_keys(tree: ast.Module, name: str) -> set[str]:
    table = _dict_literal(tree, name)
    if table is None:
        return set()
    return {k.value for k in table.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) bodies."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def _resolve_relative(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def collect_imports(path: Path, tree: ast.Module, name: str, is_package: bool) -> list[Import]:
    """Every import in the file, with its line and how it reads."""
    checking = _type_checking_lines(tree)
    out: list[Import] = []
    lazy_by_variable = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(
                    Import(
                        path,
                        node.lineno,
                        alias.name,
                        text=f"import {alias.name}",
                        type_checking=node.lineno in checking,
                    )
                )
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_relative(node.module, node.level, name, is_package)
            for alias in node.names:
                out.append(
                    Import(
                        path,
                        node.lineno,
                        module,
                        alias.name,
                        text=f"from {'.' * node.level}{node.module or ''} import {alias.name}",
                        type_checking=node.lineno in checking,
                    )
                )
        elif isinstance(node, ast.Call) and _is_import_module_call(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append(
                    Import(path, node.lineno, arg.value, text=f"import_module({arg.value!r})")
                )
            else:
                lazy_by_variable = True
    if lazy_by_variable:
        # a lazy package: its name -> module table holds its imports
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("fedsm.")
                and node.value.replace(".", "").replace("_", "").isalnum()
            ):
                out.append(
                    Import(path, node.lineno, node.value, text=f"lazy import {node.value!r}")
                )
    return out


def scan(package: Path = PACKAGE) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = module_name(path)
        is_package = path.name == "__init__.py"
        modules[name] = Module(
            name=name,
            path=path,
            is_package=is_package,
            tree=tree,
            defines=defined_names(tree),
            all=declared_all(tree),
            imports=collect_imports(path, tree, name, is_package),
        )
    return modules


MODULES = scan()


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def _lazy_target(package: Module, name: str) -> str | None:
    """The module a lazy package's table maps ``name`` to, if it has such a table."""
    for stmt in package.tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            table = _dict_literal(package.tree, target.id)
            if table is None:
                continue
            for key, value in zip(table.keys, table.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == name
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    return value.value
    return None


def resolve(imp: Import, modules: dict[str, Module] = MODULES, depth: int = 0) -> str:
    """The module ``imp`` really takes its name from (through package ``__init__`` files)."""
    if imp.name is None:
        return imp.module
    submodule = f"{imp.module}.{imp.name}"
    if submodule in modules:
        return submodule
    source = modules.get(imp.module)
    if source is None or not source.is_package or imp.name in source.defines or depth > 10:
        return imp.module
    lazy = _lazy_target(source, imp.name)
    if lazy is not None:
        return lazy
    for inner in source.imports:
        if inner.name == imp.name and inner.line in {
            s.lineno for s in source.tree.body if isinstance(s, ast.ImportFrom)
        }:
            return resolve(inner, modules, depth + 1)
    return imp.module


def imported_modules(imp: Import) -> set[str]:
    """The fedsm modules ``imp`` depends on: the one named and the one it resolves to."""
    return {imp.module, resolve(imp)}


def _fedsm(module: str) -> bool:
    return _in(module, "fedsm")


def _stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def _report(violations: list[str], rule: str) -> None:
    if violations:
        listing = "\n  ".join(sorted(set(violations)))
        pytest.fail(f"{rule}: {len(set(violations))} violation(s)\n  {listing}", pytrace=False)


# --------------------------------------------------------------------------- the rules


def test_core_is_pure() -> None:
    violations = []
    for module in MODULES.values():
        if not _in(module.name, "fedsm.core"):
            continue
        for imp in module.imports:
            if _fedsm(imp.module):
                for target in imported_modules(imp):
                    if target == "fedsm.digests":
                        if imp.name not in PURE_DIGESTS:
                            violations.append(
                                f"{imp.where()}: core takes only {sorted(PURE_DIGESTS)} "
                                "from fedsm.digests (by name)"
                            )
                    elif not (_in(target, "fedsm.core") or target == "fedsm.errors"):
                        violations.append(
                            f"{imp.where()}: core imports {target} (only fedsm.core, "
                            "fedsm.errors, fedsm.digests)"
                        )
            elif imp.type_checking:
                continue
            elif _stdlib(imp.module):
                if imp.module.split(".")[0] not in PURE_STDLIB:
                    violations.append(
                        f"{imp.where()}: {imp.module} is not in the pure standard library "
                        "the core may use (tests/test_layers.py PURE_STDLIB)"
                    )
            elif imp.module.split(".")[0] not in CORE_LIBRARIES:
                violations.append(
                    f"{imp.where()}: core uses only {sorted(CORE_LIBRARIES)} outside the "
                    "standard library"
                )
    _report(violations, "fedsm.core must stay pure")


def test_log_builds_on_core_only() -> None:
    allowed = ("fedsm.log", "fedsm.core", "fedsm.errors", "fedsm.digests")
    violations = []
    for module in MODULES.values():
        if not _in(module.name, "fedsm.log"):
            continue
        for imp in module.imports:
            if _fedsm(imp.module):
                violations += [
                    f"{imp.where()}: log imports {target} (only {', '.join(allowed)})"
                    for target in imported_modules(imp)
                    if not any(_in(target, layer) for layer in allowed)
                ]
            elif not _stdlib(imp.module) and imp.module.split(".")[0] not in CORE_LIBRARIES:
                violations.append(
                    f"{imp.where()}: log uses only the standard library and "
                    f"{sorted(CORE_LIBRARIES)}"
                )
    _report(violations, "fedsm.log imports only log, core, errors, digests")


def test_root_modules_import_nothing_above_them() -> None:
    violations = []
    for name in ("fedsm.errors", "fedsm.digests"):
        for imp in MODULES[name].imports:
            if _fedsm(imp.module):
                if imp.module != "fedsm.errors":
                    violations.append(f"{imp.where()}: {name} may import only fedsm.errors")
            elif imp.type_checking:
                continue
            elif not _stdlib(imp.module) or imp.module.split(".")[0] not in PURE_STDLIB:
                violations.append(
                    f"{imp.where()}: {name} is imported by the pure core; it may use only "
                    "the pure standard library"
                )
    _report(violations, "fedsm.errors and fedsm.digests are the root")


def test_layers_import_only_downwards() -> None:
    violations = []
    for module in MODULES.values():
        if module.name in FACADES:
            continue
        for imp in module.imports:
            if not _fedsm(imp.module):
                continue
            for target in imported_modules(imp):
                if _in(target, "fedsm.cli") and not _in(module.name, "fedsm.cli"):
                    violations.append(f"{imp.where()}: only fedsm.cli imports {target}")
                # fedsm.testing (contract suites, models, the node probe) may use every layer
                # but the command line, which may use it (``fedsm check``).
                if _in(target, "fedsm.researcher") and not (
                    _in(module.name, "fedsm.cli")
                    or _in(module.name, "fedsm.researcher")
                    or _in(module.name, "fedsm.testing")
                ):
                    violations.append(
                        f"{imp.where()}: only fedsm.cli, fedsm.researcher and fedsm.testing "
                        f"import {target}"
                    )
                for low, high in FORBIDDEN:
                    if _in(module.name, low) and _in(target, high):
                        violations.append(f"{imp.where()}: {low} must not import {high}")
    _report(violations, "layers import downwards only")


def test_names_are_imported_from_where_they_are_defined() -> None:
    violations = []
    for module in MODULES.values():
        for imp in module.imports:
            if imp.name is None or not _fedsm(imp.module):
                continue
            if imp.name == "*":
                violations.append(f"{imp.where()}: no star imports of fedsm modules")
                continue
            if f"{imp.module}.{imp.name}" in MODULES:
                continue  # a submodule
            source = MODULES.get(imp.module)
            if source is None:
                violations.append(f"{imp.where()}: there is no module {imp.module}")
            elif imp.name in source.defines:
                continue
            elif source.is_package and source.all is not None:
                if imp.name not in source.all:
                    violations.append(f"{imp.where()}: {imp.name} is not in {imp.module}.__all__")
            else:
                homes = sorted({i.module for i in source.imports if i.name == imp.name})
                hint = f" (it comes from {', '.join(homes)})" if homes else ""
                violations.append(
                    f"{imp.where()}: {imp.module} does not define {imp.name}{hint}; "
                    "import it from where it is defined"
                )
    _report(violations, "no re-exports outside public package __init__ files")


def test_public_packages_declare_all() -> None:
    missing = [p for p in PUBLIC_PACKAGES if MODULES[p].all is None]
    assert not missing, f"these package __init__ files must declare __all__: {missing}"


# --------------------------------------------------------------------------- the scanner


def test_the_scanner_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Guard against a checker gone blind: each form of import is found, with its line."""
    source = (
        "from __future__ import annotations\n"  # 1
        "import os\n"  # 2
        "from typing import TYPE_CHECKING\n"  # 3
        "if TYPE_CHECKING:\n"  # 4
        "    from fedsm.researcher.job import Job\n"  # 5
        "def f():\n"  # 6
        "    import fedsm.cli\n"  # 7
        "    importlib.import_module('fedsm.audit.report')\n"  # 8
        "    from .sibling import thing\n"  # 9
        "X, (Y, *Z) = 1, (2, 3)\n"  # 10
        "__all__ = ['X']\n"  # 11
    )
    tree = ast.parse(source)
    path = ROOT / "fedsm" / "core" / "example.py"
    found = {
        (i.line, i.module, i.name, i.type_checking)
        for i in collect_imports(path, tree, "fedsm.core.example", False)
    }
    assert found >= {
        (2, "os", None, False),
        (5, "fedsm.researcher.job", "Job", True),
        (7, "fedsm.cli", None, False),
        (8, "fedsm.audit.report", None, False),
        (9, "fedsm.core.sibling", "thing", False),
    }
    assert defined_names(tree) >= {"X", "Y", "Z", "f", "__all__"}
    assert "os" not in defined_names(tree) and "Job" not in defined_names(tree)
    assert declared_all(tree) == {"X"}
    some = Import(path, 7, "fedsm.cli", text="import fedsm.cli")
    assert some.where() == "fedsm/core/example.py:7: `import fedsm.cli`"


def test_names_through_package_inits_resolve_to_their_modules() -> None:
    lazy = Import(PACKAGE / "x.py", 1, "fedsm.training", "TrainingArgs")
    assert resolve(lazy) == "fedsm.training.args"
    eager = Import(PACKAGE / "x.py", 1, "fedsm.repository", "LocalRepository")
    assert resolve(eager) == "fedsm.repository.local"
    sub = Import(PACKAGE / "x.py", 1, "fedsm.node", "registry")
    assert resolve(sub) == "fedsm.node.registry"
