"""The README's set-up commands are CI's, and its offline command runs as written (the online one differs only
in --model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_commands_are_the_ci_commands():
    blocks = _bash_blocks()
    main_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "python -m jobs.rerank --input examples/skincare.parquet" in main_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow  # the README's command as a user runs it: a process of its own, a fresh local Ray
def test_readme_offline_run_works(tmp_path):
    offline = next(
        b.strip() for b in _bash_blocks() if "--model dummy:tiny" in b and "jobs.rerank" in b
    )
    args = offline.split()
    args[args.index("--output") + 1] = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (
        summary["input_rows"] == summary["scored_rows"] == 10 and summary["random_weights"] is True
    )
    # The line on stdout names the model and says loudly that its weights are random.
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["model"] == "dummy:tiny" and printed["random_weights"] is True
    assert printed["warning"].startswith("RANDOM WEIGHTS: dummy:tiny has random weights")
