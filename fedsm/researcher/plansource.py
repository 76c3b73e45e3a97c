"""The exact source of a training plan: what nodes hash, approve and import.

Two ways to name a plan, as in the seed's ``Job``:

- a class (``training_plan_class=MyPlan``): its module source as
  :meth:`fedsm.training.plan.TorchTrainingPlan.save_code` writes it (imports, then the class),
  checked to import on its own. The class may come from a ``.py`` file or from an IPython or
  Jupyter cell: the same cell gives the same source, and so the same sha256, in any session;
- a file and a class name (``training_plan_path=FILE``, ``training_plan_class="MyPlan"``): the
  file's bytes as they are (decoded as UTF-8, no newline translation), so the digest is the
  sha256 of the file a node operator approves with ``fedsm node plan approve FILE``.

The Job writes ``source.encode("utf-8")`` and nodes hash those bytes; ``fedsm plan hash``
prints that digest before a job is started.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

from fedsm.researcher.errors import JobError

__all__ = ["plan_source"]


def plan_source(plan_class: type | str | None, plan_path: str | Path | None) -> tuple[str, str]:
    """The exact source nodes will hash and import, and the plan's class name.

    Raises
    ------
    JobError
        A missing or non-UTF-8 file, or a class that is not a ``TorchTrainingPlan``.
    PlanError
        The class's source can not be read, or does not import on its own.
    """
    if plan_path is not None:
        if not isinstance(plan_class, str):
            raise JobError("with training_plan_path, give training_plan_class as the class name")
        path = Path(plan_path)
        if not path.is_file():
            raise JobError(f"training plan file {path} does not exist")
        try:
            return path.read_bytes().decode("utf-8"), plan_class
        except UnicodeDecodeError as exc:
            raise JobError(f"training plan file {path} is not UTF-8 text: {exc}") from None
    from fedsm.training.plan import TorchTrainingPlan

    if not (inspect.isclass(plan_class) and issubclass(plan_class, TorchTrainingPlan)):
        raise JobError(
            "training_plan_class must be a TorchTrainingPlan subclass (or a name "
            "together with training_plan_path)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "plan.py"
        plan_class().save_code(target)
        # The bytes save_code wrote (and hashed): no newline translation on the way back.
        return target.read_bytes().decode("utf-8"), plan_class.__name__
