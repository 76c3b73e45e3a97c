"""The experiment script in the README works: its plan class, taken from the README itself,
runs through an Experiment on the embedded federation."""

from __future__ import annotations

import re
from pathlib import Path

from job_world import make_world

from fedsm.researcher.experiment import Experiment
from fedsm.strategies.fedavg import FedAvg

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_script() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    script = next(b for b in blocks if "class LogisticPlan" in b)
    return script


def test_readme_plan_trains_through_an_experiment(tmp_path: Path) -> None:
    script = readme_script()
    # Keep the imports and the plan; the transport lines name a remote broker.
    plan_source = script.split("\nbus = ")[0]
    plan_file = tmp_path / "readme_plan.py"
    plan_file.write_text(plan_source, encoding="utf-8")
    world = make_world(tmp_path / "world", 2)
    try:
        for node in world.nodes:  # the operators approve this exact file
            node.plans.decide("approved", source=plan_file.read_bytes(), name="readme", by="test")
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="LogisticPlan",
            training_plan_path=plan_file,
            training_args={"lr": 0.5, "epochs": 3, "batch_size": 32},
            model_args={"n_features": 30},
            round_limit=2,
            min_nodes=2,
            run_dir=tmp_path / "run",
            bus=world.researcher(),
            repository=world.repository,
            seed=42,
            aggregator=FedAvg,  # the class, as the seed's Experiment takes it
            progress=False,
            on_round=lambda summary: None,
        )
        final = exp.run()
        history = exp.history()
        assert [h["round"] for h in history] == [1, 2]
        assert history[1]["metrics"]["train_loss"] < history[0]["metrics"]["train_loss"]
        assert exp.final_params_path().name.startswith(final)
        exp.close()
    finally:
        world.close()
