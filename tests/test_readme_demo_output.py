"""The README quotes what `make demo` prints: the same final digest and accuracies, the same
last round and final validation lines. A README that drifts from the demo fails here."""

from __future__ import annotations

import re
from pathlib import Path

from fedsm.cli.demo.run import DemoConfig, run_demo

README = Path(__file__).resolve().parent.parent / "README.md"


def _quoted_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## What `make demo` does")
    block = text[start:].split("```", 2)[1]
    return block


def test_the_readme_quotes_what_make_demo_prints(tmp_path: Path) -> None:
    quoted = _quoted_block()
    lines: list[str] = []
    result = run_demo(tmp_path / "run", DemoConfig(), say=lines.append)
    printed = "\n".join(lines + result.lines())
    for key in ("final_params_sha256", "federated_accuracy", "local_accuracy"):
        value = re.search(rf"^{key}=(\S+)$", quoted, re.M)
        assert value is not None, f"the README's demo block lost its {key} line"
        assert f"{key}={value.group(1)}" in printed, f"{key}: README {value.group(1)}"
    for line in quoted.splitlines():
        if line.startswith(("round 10/10:", "final validation")):
            assert line.rstrip(" .") in printed, line
