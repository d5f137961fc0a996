"""The console of a job that starts its own Ray holds the job's lines only: a scorer that fails while loading
ends in one `error:` line on stderr, and nothing Ray prints for itself (its error channel's "(raylet) Task ...
failed" tracebacks, its logger's notices, its C++ core's log lines) reaches stdout or stderr."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file, save_file

from pipeline.model.dummy import dummy_checkpoint

ROOT = Path(__file__).resolve().parents[2]

# What Ray's own printers put on the console: its error channel and workers ("(raylet) ...", "(pid=...)"), its
# Python logger ("2026-12-07 14:39:40,247\tWARNING x.py:85 -- ..."), its C++ core ("[2026-... E 1 1] x.cc:1:").
RAY_LINE = re.compile(
    r"\(raylet\)|\(pid=|\(\w+ pid=|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ \S+\.py:\d+ --|"
    r"^\[\d{4}-\d\d-\d\d [^]]*\] \S+\.(?:cc|h):\d+:|Traceback"
)


def _garbage_weights(tmp_path: Path) -> Path:
    """A checkpoint the driver's check accepts (a readable safetensors file, a known layout) whose weight shapes
    do not fit its config: it fails in the scorer actor, while loading, on every try Ray makes."""
    model = tmp_path / "wrong-shapes"
    shutil.copytree(dummy_checkpoint("tiny"), model)
    tensors = load_file(model / "model.safetensors")
    name = sorted(name for name in tensors if name.endswith("fc2.weight"))[0]
    tensors[name] = tensors[name].reshape(-1)[:3].copy()
    save_file(tensors, model / "model.safetensors")
    return model


@pytest.mark.slow
def test_a_scorer_failing_at_load_is_one_error_line_and_nothing_from_ray(shared_data, tmp_path):
    topics = json.loads((shared_data / "trec-dl" / "retrieve_results_dl19.json").read_text())
    rows = [
        dict(query_id=h["qid"], query=t["query"], doc_id=h["docid"], document=h["content"])
        for t in topics[:2]
        for h in t["hits"][:10]
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.rerank",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(_garbage_weights(tmp_path)),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    both = result.stdout + result.stderr
    assert result.returncode == 2, both[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fc2.weight" in errors[0] and "shape" in errors[0], both[-3000:]
    ray_lines = [line for line in both.splitlines() if RAY_LINE.search(line)]
    assert not ray_lines, ray_lines[:5]
    assert result.stdout == "", result.stdout[:3000]
    # The job's own lines only: its log lines ("HH:MM:SS LEVEL logger: ...") and the error.
    others = [
        line
        for line in result.stderr.splitlines()
        if not line.startswith("error:") and not re.match(r"\d\d:\d\d:\d\d [A-Z]+ [\w.]+: ", line)
    ]
    assert not others, others[:5]


@pytest.mark.parametrize(
    "job, inputs",
    [
        ("rerank", ["--input", "in.parquet", "--model", "dummy:tiny"]),
        ("hard_negatives", ["--input", "in.parquet"]),
        ("index_quality", ["--run", "run.txt"]),
    ],
)
def test_a_relative_output_under_ray_job_submit_is_refused(
    job, inputs, tmp_path, monkeypatch, run_entry_point
):
    """`ray job submit --working-dir .` runs the job in Ray's temporary copy of the project: a relative --output
    would land there, and go with the session."""
    import importlib

    main = importlib.import_module(f"jobs.{job}").main
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    result = run_entry_point(main, *inputs, "--output", "out")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "--output out is a relative path" in errors[0] and "ray job submit" in errors[0]
    assert "absolute path" in errors[0] and "s3://" in errors[0]
    assert not (package / "out").exists()
    # An absolute one passes this check (and fails later, on the missing input, with its own line).
    result = run_entry_point(main, *inputs, "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "relative path" not in result.stderr


def test_a_relative_output_outside_ray_jobs_is_the_users_own(tmp_path, monkeypatch):
    from pipeline.core.cli import check_job_location

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    check_job_location("out")  # no error: a relative path is the user's own folder
    monkeypatch.setenv("RAY_JOB_ID", "01000000")
    check_job_location("s3://bucket/out")
    check_job_location(str(tmp_path / "out"))
