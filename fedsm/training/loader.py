"""Import a training plan from its source text, in a fresh module, without touching sys.path.

A node receives a plan as source (approved by sha256 of those exact bytes) and needs the
class out of it. The seed inserted the download directory into ``sys.path`` and imported by
file name, which leaks modules between jobs and lets a file shadow a real package. Here the
source is compiled into a brand-new module object registered under a unique name
(``fedsm_plan_<n>_<sha256 prefix>``), so two jobs never share a module, and ``inspect``
can still show the source (it is registered with ``linecache``).

A node that simulates thousands of nodes loads a plan thousands of times per round, so a
loaded module must not outlive its use: :func:`loaded_plan_class` (what the runner uses)
drops the module from ``sys.modules`` and ``linecache`` when the block ends, and
:func:`unload_plan_class` does it for a class from :func:`load_plan_class`. Tracebacks
formatted afterwards still show the plan's lines: the module's ``__loader__`` serves its
source to ``linecache`` on demand (the file name ``<fedsm-plan>/<sha prefix>/plan.py`` is one
that ``linecache.lazycache`` accepts).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import linecache
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedsm.digests import sha256_hex
from fedsm.errors import FedsmError

if TYPE_CHECKING:
    from fedsm.training.plan import TorchTrainingPlan

__all__ = [
    "PLAN_SOURCE_ATTRIBUTE",
    "PlanImportError",
    "load_plan_class",
    "loaded_plan_class",
    "unload_plan_class",
]

PLAN_SOURCE_ATTRIBUTE = "__fedsm_plan_source__"
"""Module attribute holding the exact source a plan module was loaded from."""

_COUNTER = itertools.count(1)
_COUNTER_LOCK = threading.Lock()


class PlanImportError(FedsmError):
    """The training plan source does not compile, fails on import, or lacks the class."""


class _PlanSourceLoader:
    """The ``__loader__`` of a plan module: hands its source to ``linecache`` on demand.

    ``traceback`` calls ``linecache.lazycache(filename, frame.f_globals)`` for every frame,
    so a traceback through plan code shows the plan's lines even after the module was
    unloaded, without keeping a ``linecache`` entry per load in the meantime.
    """

    def __init__(self, source: str) -> None:
        self._source = source

    def get_source(self, name: str) -> str:
        """The plan source (whatever ``name``: one loader serves one module)."""
        return self._source


def load_plan_class(source: str, class_name: str) -> type[TorchTrainingPlan]:
    """Execute ``source`` in a fresh module and return its ``class_name`` class.

    The class must subclass :class:`fedsm.training.plan.TorchTrainingPlan`. The module stays
    in ``sys.modules`` (and its source in ``linecache``) until :func:`unload_plan_class`;
    prefer :func:`loaded_plan_class` for one-off work, or every call leaves a module behind.

    Raises
    ------
    PlanImportError
        Syntax error, exception while importing, no such class, or not a training plan.
    """
    from fedsm.training.plan import TorchTrainingPlan

    if not isinstance(source, str):
        raise PlanImportError(f"plan source must be str, got {type(source).__name__}")
    if not class_name.isidentifier():
        raise PlanImportError(f"{class_name!r} is not a valid class name")
    sha = sha256_hex(source)
    with _COUNTER_LOCK:
        number = next(_COUNTER)
    module_name = f"fedsm_plan_{number}_{sha[:12]}"
    code = _compiled(source, sha)
    filename = code.co_filename
    module = types.ModuleType(module_name)
    module.__file__ = filename
    module.__loader__ = _PlanSourceLoader(source)
    setattr(module, PLAN_SOURCE_ATTRIBUTE, source)
    # linecache lets inspect.getsource / tracebacks show the plan's lines; mtime None keeps
    # checkcache from evicting the entry.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # Registered before exec so that dataclasses, pickle-free typing helpers and
    # inspect.getmodule can resolve the module by name, as for a normal import.
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - running approved plan code is the point
    except BaseException as exc:  # noqa: BLE001 - any failure of foreign code is a plan error
        _forget(module_name, filename)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise PlanImportError(f"training plan import raised {type(exc).__name__}") from exc
        raise PlanImportError(
            f"importing the training plan failed: {type(exc).__name__}: {exc}"
        ) from exc
    cls = module.__dict__.get(class_name)
    if cls is None:
        _forget(module_name, filename)
        defined = sorted(n for n, v in vars(module).items() if inspect.isclass(v))
        raise PlanImportError(
            f"training plan source defines no {class_name!r}; classes found: {defined}"
        )
    if not (inspect.isclass(cls) and issubclass(cls, TorchTrainingPlan)):
        _forget(module_name, filename)
        raise PlanImportError(f"{class_name!r} is not a TorchTrainingPlan subclass")
    return cls


#: Compiled plan sources kept by digest (compiling is a pure function of the source; the
#: module each load executes them in is always a new one).
_CODE_CACHE_SIZE = 16
_CODE_CACHE: OrderedDict[str, types.CodeType] = OrderedDict()


def _compiled(source: str, sha: str) -> types.CodeType:
    """The code object of ``source`` (whose sha256 is ``sha``), compiled once per digest
    under the file name ``<fedsm-plan>/<sha prefix>/plan.py``."""
    with _COUNTER_LOCK:
        code = _CODE_CACHE.get(sha)
        if code is not None:
            _CODE_CACHE.move_to_end(sha)
            return code
    filename = f"<fedsm-plan>/{sha[:12]}/plan.py"
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PlanImportError(
            f"training plan source does not compile: line {exc.lineno}: {exc.msg}"
        ) from exc
    with _COUNTER_LOCK:
        _CODE_CACHE[sha] = code
        while len(_CODE_CACHE) > _CODE_CACHE_SIZE:
            _CODE_CACHE.popitem(last=False)
    return code


def _forget(module_name: str, filename: str) -> None:
    sys.modules.pop(module_name, None)
    linecache.cache.pop(filename, None)


def unload_plan_class(cls: type) -> None:
    """Drop the module of a class from :func:`load_plan_class` from ``sys.modules``/``linecache``.

    The class keeps working for whoever still holds it (its functions hold the module's
    namespace); what goes is the process-wide registration, so the module is freed once the
    class is. Idempotent; a class that was not loaded by :func:`load_plan_class` is left alone.
    """
    name = getattr(cls, "__module__", None)
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is None or not isinstance(getattr(module, PLAN_SOURCE_ATTRIBUTE, None), str):
        return
    _forget(name, getattr(module, "__file__", ""))


@contextlib.contextmanager
def loaded_plan_class(source: str, class_name: str) -> Iterator[type[TorchTrainingPlan]]:
    """:func:`load_plan_class` for the duration of a block, then :func:`unload_plan_class`.

    Use this when the class is only needed for one piece of work (a training round): the
    module is registered (``inspect``, ``typing.get_type_hints``, tracebacks all work) while
    the block runs and nothing of it stays in ``sys.modules`` or ``linecache`` afterwards.
    """
    cls = load_plan_class(source, class_name)
    try:
        yield cls
    finally:
        unload_plan_class(cls)
