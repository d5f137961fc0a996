"""Index quality measured where the data lives: the run split by hash(query_id), each part measured on its
own (a Ray task), and only queries x measures reaching the driver. On real DL19 data, against the whole run
measured in one process (`nightly.measure`, the computation the job made before)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import load_config
from pipeline.core.trec import read_qrels
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.nightly import _judge_table, evaluate_night, measure
from pipeline.quality.parts import (
    LABEL_FREE,
    LABELLED,
    RERANKED,
    RUN,
    combine,
    measure_bucket,
    plan_run,
    scatter,
)
from pipeline.quality.run_input import load_run

SETTINGS = [
    "input.judge_score_column=reranker_score",
    "segment_columns=[query_type]",
    "metrics.relevance_level=2",
    "metrics.measures=[nDCG@10,RR@10,R@100,P@10,AP,Judged@10]",
]


def _config(*extra: str) -> IndexQualityConfig:
    return load_config(IndexQualityConfig, None, [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def whole(dl19_long, dl19_qrels):
    """The old computation: the whole run loaded and measured in this process."""
    config = _config()
    loaded = load_run(
        str(dl19_long),
        score_column=None,
        judge_score_column="reranker_score",
        keep_columns=["query_type"],
    )
    qrels = read_qrels(str(dl19_qrels))
    judge, _ = _judge_table(loaded.pairs, None)
    return measure(config, loaded.pairs, qrels, judge), loaded


def test_each_bucket_measures_only_its_queries_and_together_they_equal_the_whole_run(
    dl19_long, dl19_qrels, whole, tmp_path
):
    reference, loaded = whole
    config = _config("workers.rows_per_bucket=900")
    plan = plan_run(config, str(dl19_long))
    assert plan.num_buckets == 5 and plan.estimated_rows == 4300
    work = str(tmp_path / "parts")
    assert scatter(RUN, 0, plan.files[0], plan.parquet, work, plan.num_buckets, {}) == 4300
    qrels = read_qrels(str(dl19_qrels))
    results = [
        measure_bucket(b, work, config, plan, qrels, False, 1.0) for b in range(plan.num_buckets)
    ]

    seen: set[str] = set()
    for r in results:
        assert r.error is None and r.pid == os.getpid()  # called here, in this test's process
        queries = set(r.segments["query_id"].to_pylist())
        assert (
            r.pairs == 100 * len(queries) < 4300 and not queries & seen
        )  # whole queries, in one bucket only
        seen |= queries
        # What a bucket hands back is per query: one row per query of the bucket in every family ...
        for _name, table in r.tables.items():
            assert set(table["query_id"].to_pylist()) <= queries and table.num_rows <= len(queries)
        # ... and the plot's pairs (first-stage rank, reranker rank, score), no ids, no texts.
        assert r.plot_sample.column_names == ["first_stage_rank", "reranker_rank", "score"]
    assert seen == set(loaded.pairs["query_id"].to_pylist()) and len(seen) == 43

    combined = combine(results)
    assert combined.pairs == 4300 and combined.unjudged_pairs == 0
    assert set(combined.tables) == {LABELLED, LABEL_FREE, RERANKED}
    # Value for value the tables the whole run gives (sorted by query_id; floats compared exactly).
    reference_tables = {
        LABELLED: reference.overall,
        LABEL_FREE: reference.label_free,
        RERANKED: reference.reranked,
    }
    from pipeline.quality.nightly import _measured

    measured = _measured(combined.tables)
    assert measured.per_query.equals(reference.per_query)
    assert measured.means == reference.means and measured.overall == reference_tables[LABELLED]
    assert sorted(combined.judge_pairs.to_pylist(), key=str) == sorted(
        reference.judge_pairs.to_pylist(), key=str
    )
    assert combined.score_moments["count"] == reference.score_summary["count"] == 4300
    # The same bytes with another split.
    one = _config("workers.rows_per_bucket=1000000")
    plan_one = plan_run(one, str(dl19_long))
    assert plan_one.num_buckets == 1
    scatter(RUN, 0, plan_one.files[0], True, str(tmp_path / "one"), 1, {})
    single = combine([measure_bucket(0, str(tmp_path / "one"), one, plan_one, qrels, False, 1.0)])
    assert all(single.tables[name].equals(combined.tables[name]) for name in combined.tables)


def test_the_plot_sample_is_the_same_pairs_whatever_the_split(dl19_long, tmp_path):
    config = _config()
    samples = []
    for buckets in (1, 3):
        plan = plan_run(_config(f"workers.rows_per_bucket={-(-4300 // buckets)}"), str(dl19_long))
        assert plan.num_buckets == buckets
        work = str(tmp_path / f"b{buckets}")
        scatter(RUN, 0, plan.files[0], True, work, buckets, {})
        combined = combine(
            [measure_bucket(b, work, config, plan, None, False, 0.25) for b in range(buckets)]
        )
        samples.append(sorted(combined.judge_pairs.to_pylist(), key=str))
        # Exact moments over every judged pair, whatever was sampled.
        assert combined.score_moments["count"] == 4300
    assert samples[0] == samples[1] and 0 < len(samples[0]) < 4300 * 0.4


def test_a_bad_part_is_one_line_on_the_driver(tmp_path):
    table = pa.table({"query_id": ["q1", "q1", "q2"], "doc_id": ["d", "d", "e"], "rank": [1, 2, 1]})
    pq.write_table(table, tmp_path / "run.parquet")
    config = _config("input.judge_score_column=null")
    plan = plan_run(config, str(tmp_path / "run.parquet"))
    scatter(RUN, 0, plan.files[0], True, str(tmp_path / "w"), 1, {})
    result = measure_bucket(0, str(tmp_path / "w"), config, plan, None, False, 1.0)
    assert "lists document 'd' for query 'q1' more than once" in result.error
    with pytest.raises(Exception, match="more than once"):
        combine([result])


@pytest.mark.slow  # the parts measured on Ray tasks, in worker processes
def test_the_job_measures_its_parts_on_ray_tasks_and_the_driver_gets_queries_by_measures(
    ray_local, dl19_long, dl19_qrels, whole, tmp_path
):
    reference, _ = whole
    config = _config(
        "workers.rows_per_bucket=500",
        "workers.num_cpus=0.5",
        "workers.max_in_flight=3",
        "night=2024-05-01",
    )
    report = evaluate_night(
        config, run=str(dl19_long), output=str(tmp_path / "out"), qrels=str(dl19_qrels)
    )
    # Nine parts, every one read and measured in a Ray worker, none in this (the driver's) process.
    assert len(report.parts) == 9 and report.extra["num_parts"] == 9
    assert all(p["pid"] != os.getpid() for p in report.parts)
    assert (
        sum(p["pairs"] for p in report.parts) == 4300
        and max(p["pairs"] for p in report.parts) < 4300
    )
    assert sum(p["queries"] for p in report.parts) == 43
    # The driver's tables: queries x measures, equal to the whole run measured in one process.
    per_query = pq.read_table(tmp_path / "out" / "per_query.parquet")
    assert per_query.num_rows == 43
    assert per_query.drop_columns(["query_type"]).equals(reference.per_query)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"] == reference.overall and metrics["reranked"] == reference.reranked
    assert metrics["label_free"]["measures"] == reference.label_free
    assert metrics["label_free"]["score_summary"]["count"] == 4300 and metrics["num_pairs"] == 4300
    assert not (tmp_path / "out" / "_parts").exists()  # the fragments are removed
    assert pc.all(pc.equal(per_query["query_id"], reference.per_query["query_id"])).as_py()
