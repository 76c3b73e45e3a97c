"""The README's "Test your own transport / repository / strategy" example, run as written: its
code block is written to a file and run by pytest in a subprocess; every contract test in it
must pass (and there must be some of each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Test your own transport / repository / strategy") :]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block.startswith("# test_my_fedsm_parts.py")
    return block


def test_the_readme_contract_example_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "test_my_fedsm_parts.py").write_text(_example(), encoding="utf-8")
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text(), encoding="utf-8")  # profiles
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**__import__("os").environ, "HYPOTHESIS_PROFILE": "ci"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary, summary
    for cls in ("TestMyBus", "TestMyRepository", "TestMyStrategy"):
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "--collect-only",
                "-p",
                "no:cacheprovider",
                f"{tmp_path / 'test_my_fedsm_parts.py'}::{cls}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert listed.returncode == 0 and "test_" in listed.stdout, (cls, listed.stdout[-1000:])
