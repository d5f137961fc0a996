"""The job's --run: TREC text, long and grouped Parquet; which column orders; rejected rows; segments."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import InputError
from pipeline.quality.run_input import load_run
from pipeline.quality.segments import query_segments, segment_means


def _write(tmp_path, table: pa.Table, name="run.parquet") -> str:
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_trec_run_is_ordered_by_score_like_trec_eval(shared_data):
    loaded = load_run(str(shared_data / "trec-eval" / "results.test"))
    assert loaded.order_column == "score" and loaded.pairs.num_rows == 1500
    first = loaded.pairs.slice(0, 2).to_pylist()
    assert first[0]["first_stage_rank"] == 1 and first[0]["score"] >= first[1]["score"]


def test_rerank_output_is_ordered_by_first_stage_rank_not_by_the_rerankers_columns(tmp_path):
    # The rerank job's output: score/rank are the reranker's; first_stage_rank must win.
    table = pa.table(
        {
            "query_id": ["q"] * 3,
            "doc_id": ["a", "b", "c"],
            "first_stage_rank": [3, 1, 2],
            "score": [9.0, 1.0, 5.0],
            "rank": [1, 3, 2],
        }
    )
    loaded = load_run(_write(tmp_path, table), judge_score_column="score")
    assert loaded.order_column == "first_stage_rank"
    assert loaded.pairs["doc_id"].to_pylist() == ["b", "c", "a"]
    assert loaded.pairs["judge_score"].to_pylist() == [1.0, 5.0, 9.0]


def test_grouped_format_is_exploded(tmp_path):
    table = pa.table(
        {
            "query_id": ["q1", "q2"],
            "query": ["x", "y"],
            "candidates": [
                [
                    {"doc_id": "a", "document": "A", "first_stage_rank": 2},
                    {"doc_id": "b", "document": "B", "first_stage_rank": 1},
                ],
                [{"doc_id": "c", "document": "C", "first_stage_rank": 1}],
            ],
        }
    )
    pairs = load_run(_write(tmp_path, table)).pairs
    assert [
        (r["query_id"], r["doc_id"], r["first_stage_rank"], r["query"]) for r in pairs.to_pylist()
    ] == [("q1", "b", 1, "x"), ("q1", "a", 2, "x"), ("q2", "c", 1, "y")]


def test_unusable_rows_are_rejected_with_a_reason_not_dropped(tmp_path):
    table = pa.table(
        {
            "query_id": ["q", "q", None, "q"],
            "doc_id": ["a", None, "c", "d"],
            "first_stage_score": [1.0, 2.0, 3.0, float("nan")],
        }
    )
    loaded = load_run(_write(tmp_path, table))
    assert loaded.pairs["doc_id"].to_pylist() == ["a"]
    assert loaded.rejected["reason"].to_pylist() == [
        "null doc_id",
        "null query_id",
        "null or NaN first-stage first_stage_score",
    ]
    assert loaded.pairs.num_rows + loaded.rejected.num_rows == table.num_rows


@pytest.mark.parametrize(
    "table, kwargs, message",
    [
        (pa.table({"query_id": ["q"], "doc_id": ["a"], "bm25": [1.0]}), {}, "no first-stage order"),
        (
            pa.table({"query_id": ["q"], "doc_id": ["a"], "rank": [1]}),
            {"rank_column": "pos"},
            "`pos`.*not found",
        ),
        (
            pa.table({"query_id": ["q", "q"], "doc_id": ["a", "a"], "rank": [1, 2]}),
            {},
            "more than once",
        ),
        (pa.table({"query_id": ["q"], "doc_id": ["a"], "rank": ["first"]}), {}, "must be numeric"),
        (
            pa.table({"query_id": ["q"], "doc_id": ["a"], "rank": [1]}),
            {"judge_score_column": "ce"},
            "`ce` not in",
        ),
    ],
)
def test_bad_runs_are_clear_errors(tmp_path, table, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_run(_write(tmp_path, table), **kwargs)


def test_segments_split_every_measure(tmp_path):
    table = pa.table(
        {
            "query_id": ["q1", "q1", "q2", "q3"],
            "doc_id": ["a", "b", "a", "a"],
            "rank": [1, 2, 1, 1],
            "lang": ["de", "de", "en", None],
        }
    )
    pairs = load_run(_write(tmp_path, table), keep_columns=["lang"]).pairs
    segments = query_segments(pairs, ["lang"])
    per_query = pa.table({"query_id": ["q1", "q2", "q3"], "nDCG@10": [1.0, 0.5, 0.25]})
    assert segment_means(per_query, segments, ["lang"]) == {
        "lang": {
            "(null)": {"nDCG@10": 0.25, "num_queries": 1},
            "de": {"nDCG@10": 1.0, "num_queries": 1},
            "en": {"nDCG@10": 0.5, "num_queries": 1},
        }
    }


def test_segment_must_be_a_property_of_the_query(tmp_path):
    table = pa.table(
        {"query_id": ["q1", "q1"], "doc_id": ["a", "b"], "rank": [1, 2], "lang": ["de", "en"]}
    )
    pairs = load_run(_write(tmp_path, table), keep_columns=["lang"]).pairs
    with pytest.raises(InputError, match="several values within query 'q1'"):
        query_segments(pairs, ["lang"])


def test_segment_column_missing_from_a_trec_run_says_what_to_do(shared_data):
    pairs = load_run(str(shared_data / "trec-eval" / "results.test"), keep_columns=["lang"]).pairs
    with pytest.raises(InputError, match="pass a Parquet run that carries them"):
        query_segments(pairs, ["lang"])
