"""Import a training plan from its source text, in a fresh module, without touching sys.path.

A node receives a plan as source (approved by sha256 of those exact bytes) and needs the
class out of it. The seed inserted the download directory into ``sys.path`` and imported by
file name, which leaks modules between jobs and lets a file shadow a real package. Here the
source is compiled into a brand-new module object registered under a unique name
(``fedsm_plan_<n>_<sha256 prefix>``), so two jobs never share a module, and ``inspect``
can still show the source (it is registered with ``linecache``).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import linecache
import sys
import threading
import types
from typing import TYPE_CHECKING

from fedsm.errors import FedsmError

if TYPE_CHECKING:
    from fedsm.training.plan import TorchTrainingPlan

__all__ = ["PLAN_SOURCE_ATTRIBUTE", "PlanImportError", "load_plan_class"]

PLAN_SOURCE_ATTRIBUTE = "__fedsm_plan_source__"
"""Module attribute holding the exact source a plan module was loaded from."""

_COUNTER = itertools.count(1)
_COUNTER_LOCK = threading.Lock()


class PlanImportError(FedsmError):
    """The training plan source does not compile, fails on import, or lacks the class."""


def load_plan_class(source: str, class_name: str) -> type[TorchTrainingPlan]:
    """Execute ``source`` in a fresh module and return its ``class_name`` class.

    The class must subclass :class:`fedsm.training.plan.TorchTrainingPlan`.

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
    sha = hashlib.sha256(source.encode("utf-8")).hexdigest()
    with _COUNTER_LOCK:
        number = next(_COUNTER)
    module_name = f"fedsm_plan_{number}_{sha[:12]}"
    filename = f"<fedsm-plan {sha[:12]} #{number}>"
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PlanImportError(
            f"training plan source does not compile: line {exc.lineno}: {exc.msg}"
        ) from exc
    module = types.ModuleType(module_name)
    module.__file__ = filename
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
        sys.modules.pop(module_name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise PlanImportError(f"training plan import raised {type(exc).__name__}") from exc
        raise PlanImportError(
            f"importing the training plan failed: {type(exc).__name__}: {exc}"
        ) from exc
    cls = module.__dict__.get(class_name)
    if cls is None:
        sys.modules.pop(module_name, None)
        defined = sorted(n for n, v in vars(module).items() if inspect.isclass(v))
        raise PlanImportError(
            f"training plan source defines no {class_name!r}; classes found: {defined}"
        )
    if not (inspect.isclass(cls) and issubclass(cls, TorchTrainingPlan)):
        sys.modules.pop(module_name, None)
        raise PlanImportError(f"{class_name!r} is not a TorchTrainingPlan subclass")
    return cls
