"""Rows far bigger than a DL19 pair (16 KB documents, texts carried to ranked/) against a small in-flight budget:
batches are cut to fit it, a batch that never can is refused up front, and a pipeline that stops moving ends in
one line instead of waiting forever."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rerank import main as rerank_main
from pipeline.core.config import load_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank
from pipeline.rerank.plan import StageClasses
from pipeline.rerank.stages.score import ScoreStage

DOC_BYTES = 16 * 2**10


def long_documents(dl19_rows: list[dict], pairs: int, doc_bytes: int = DOC_BYTES) -> list[dict]:
    """`pairs` DL19 pairs whose documents are DL19 passages joined to `doc_bytes` characters (each one distinct)."""
    passages = [r["document"] for r in dl19_rows]
    rows = []
    for i in range(pairs):
        row, parts, k = dict(dl19_rows[i % len(dl19_rows)]), [], i
        while sum(map(len, parts)) < doc_bytes:
            parts.append(passages[k % len(passages)])
            k += 7
        row["doc_id"] = f"{row['doc_id']}-{i}"
        row["document"] = " ".join(parts)[:doc_bytes]
        rows.append(row)
    return rows


@pytest.mark.slow
def test_big_rows_carried_under_a_small_budget_run_to_completion(ray_local, dl19_rows, tmp_path):
    # 1,000 pairs of 16 KB with the default batch sizes (2,048 rows a scorer call, 1,024 a tokenizer call) and the
    # smallest budget: before batches were sized in bytes, this scored nothing and never ended.
    rows = long_documents(dl19_rows, 1000)
    source = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source, row_group_size=250)
    config = load_config(
        RerankConfig,
        None,
        [
            "output.carry_texts=true",
            "io.in_flight_mb=16",
            "tokenizer.max_length=64",
            "io.stall_timeout_s=240",
        ],
        model="dummy:tiny",
    )

    summary = run_rerank(config, str(source), str(tmp_path / "out"))

    assert (summary["input_rows"], summary["scored_rows"], summary["rejected_rows"]) == (
        1000,
        1000,
        0,
    )
    ranked = pa.concat_tables(
        [pq.read_table(f) for f in sorted((tmp_path / "out" / "ranked").glob("*.parquet"))]
    )
    assert ranked.num_rows == 1000
    got = {
        (q, d): doc
        for q, d, doc in zip(
            *(ranked.column(c).to_pylist() for c in ("query_id", "doc_id", "document"))
        )
    }
    assert got == {(r["query_id"], r["doc_id"]): r["document"] for r in rows}
    assert all(len(doc) == DOC_BYTES for doc in got.values())


@pytest.mark.slow
def test_a_stalled_pipeline_ends_in_one_line_and_resumes(
    ray_local, dl19_rows, tmp_path, monkeypatch, run_entry_point
):
    import ray._private.worker

    class BlockingScorer(ScoreStage):
        """Takes its first batch, reports one pair scored, and never returns, as a hung device would. A local
        class: Ray's pickle sends it by value, the actors need not import this test module."""

        def __call__(self, batch):
            self.on_scored(
                1, 0
            )  # the watchdog's clock starts here, not while actors start on a loaded machine
            threading.Event().wait()

    # The job's own process keeps Ray's error channel ("(raylet) Task ... failed") off the console
    # (local_ray.quiet_ray_console, before ray.init); this run shares the session's Ray, so it does the same.
    monkeypatch.setattr(ray._private.worker, "_worker_logs_enabled", False)
    source = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:600]), source, row_group_size=200)
    argv = [
        "--input",
        source,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
        "--set",
        "io.stall_timeout_s=20",
        "--set",
        "progress_interval_s=0.5",
        "--set",
        "tokenizer.max_length=64",
        "--set",
        "input.rows_per_shard=200",
        "--set",
        "tokenizer.batch_size=64",
        "--set",
        "scorer.batch_size=64",
    ]
    blocking = functools.partial(rerank_main, stages=StageClasses(score=BlockingScorer))
    result = run_entry_point(blocking, *argv)

    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "io.stall_timeout_s=20" in errors[0] and "rerun the same command" in errors[0], errors[0]
    # Which stage it names depends on how far the run got on a loaded machine (the scorer, once called, blocks;
    # before that, actors may still be starting when the clock runs out).
    assert (
        any(f"the {stage}" in errors[0] for stage in ("reader", "tokenizer", "BlockingScorer"))
        or "could not start" in errors[0]
    ), errors[0]
    if (
        "the BlockingScorer has been running" in errors[0]
    ):  # the stage after it named as users know it
        assert "the writer waits on it" in errors[0], errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out" / "summary.json").exists()
    # Ray Data's execution was shut down, not left spinning: its scheduling thread has ended.
    running = [
        t for t in threading.enumerate() if t.name.startswith("StreamingExecutor") and t.is_alive()
    ]
    assert not running, running

    # Once the scorer is fixed, the same command finishes the output.
    result = run_entry_point(rerank_main, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])["scored_rows"] == 600


def test_a_pair_bigger_than_a_batch_may_hold_is_refused_before_any_work(
    dl19_rows, tmp_path, run_entry_point
):
    # 1/16 of the smallest budget is 1 MB; a 2 MB document cannot travel in any batch.
    source = tmp_path / "huge.parquet"
    pq.write_table(pa.Table.from_pylist(long_documents(dl19_rows, 2, doc_bytes=2 * 2**20)), source)
    result = run_entry_point(
        rerank_main,
        "--input",
        source,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
        "--set",
        "io.in_flight_mb=16",
    )

    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "io.in_flight_mb" in errors[0] and "Traceback" not in result.stderr
    ), result.stderr
    assert "raise io.in_flight_mb to at least 33" in errors[0], errors[0]
    assert not Path(tmp_path / "out").exists()  # refused before the output was created
