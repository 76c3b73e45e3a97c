"""The exact source of a training plan: what nodes hash, approve and import."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

from fedsm.researcher.errors import JobError

__all__ = ["plan_source"]


def plan_source(plan_class: type | str | None, plan_path: str | Path | None) -> tuple[str, str]:
    """The exact source nodes will hash and import, and the plan's class name."""
    if plan_path is not None:
        if not isinstance(plan_class, str):
            raise JobError("with training_plan_path, give training_plan_class as the class name")
        path = Path(plan_path)
        if not path.is_file():
            raise JobError(f"training plan file {path} does not exist")
        return path.read_text(encoding="utf-8"), plan_class
    if not inspect.isclass(plan_class):
        raise JobError(
            "training_plan_class must be a TorchTrainingPlan subclass (or a name "
            "together with training_plan_path)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "plan.py"
        plan_class().save_code(target)
        return target.read_text(encoding="utf-8"), plan_class.__name__
