"""The storage-bound stages run as Ray tasks: a task whose worker process dies (an OOM kill, a lost node) runs
again, and every pair still appears once. Both the staging writer and the ranker die once in one run."""

from __future__ import annotations

import functools
import json
import os

import pyarrow.parquet as pq

from jobs.rerank import main as rerank_main
from pipeline.rerank.plan import StageClasses
from pipeline.rerank.stages.rank import RankBucket
from pipeline.rerank.stages.write import WriteScored


def _dies_once(cls: type, marker) -> type:
    """`cls` whose first call anywhere creates `marker` and ends its process (a real exit, as an OOM kill
    would be); every later call, in any worker, does the stage's work. A local class: Ray's pickle sends it by
    value, with the marker's path, to the workers of the session's Ray (whose environment is fixed)."""

    class DiesOnce(cls):
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    DiesOnce.__name__ = f"{cls.__name__}DiesOnce"
    return DiesOnce


def test_a_writer_and_a_ranker_whose_workers_die_run_again(
    ray_local, dl19_1000, tmp_path, run_entry_point
):
    writer_died, ranker_died = tmp_path / "writer-died", tmp_path / "ranker-died"
    output = tmp_path / "out"
    stages = StageClasses(
        write=_dies_once(WriteScored, writer_died), rank=_dies_once(RankBucket, ranker_died)
    )
    result = run_entry_point(
        functools.partial(rerank_main, stages=stages),
        "--input",
        dl19_1000,
        "--output",
        output,
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=500",
        "--set",
        "io.rows_per_write=250",
        "--set",
        "output.rows_per_bucket=500",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert writer_died.exists() and ranker_died.exists()  # a worker of each really died
    ranked = pq.read_table(output / "ranked")
    keys = list(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist()))
    assert len(keys) == len(set(keys)) == 1000
    summary = json.loads((output / "summary.json").read_text())
    assert summary["scored_rows"] + summary["rejected_rows"] == summary["input_rows"] == 1000
