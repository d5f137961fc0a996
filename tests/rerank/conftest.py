"""Fixtures of the rerank job tests: real DL19 pairs as Parquet, a subprocess runner (the session's local Ray,
`ray_local`, is in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dl19_rows(shared_data) -> list[dict]:
    with open(shared_data / "trec-dl" / "retrieve_results_dl19.json") as f:
        topics = json.load(f)
    return [
        dict(
            query_id=h["qid"],
            query=t["query"],
            doc_id=h["docid"],
            document=h["content"],
            rank=h["rank"],
            score=h["score"],
        )
        for t in topics
        for h in t["hits"]
    ]


@pytest.fixture(scope="session")
def dl19_long(dl19_rows, tmp_path_factory) -> Path:
    """The 4,300 DL19 pairs in the long format, in 500-row row groups (several shards)."""
    path = tmp_path_factory.mktemp("dl19") / "dl19.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows), path, row_group_size=500)
    return path


@pytest.fixture(scope="session")
def dl19_1000(dl19_rows, tmp_path_factory) -> Path:
    """The first 1,000 DL19 pairs (10 queries) in the long format, in 100-row row groups: as many shards as a
    test asks for with input.rows_per_shard, at a quarter of dl19_long's scoring."""
    path = tmp_path_factory.mktemp("dl19-1000") / "dl19_1000.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:1000]), path, row_group_size=100)
    return path


def read_dir(path) -> pa.Table:
    files = sorted(Path(path).glob("*.parquet"))
    return (
        pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
        if files
        else None
    )


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The job as a user runs it: its own process, its own Ray."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
