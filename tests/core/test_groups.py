"""Position within a group (`pipeline.core.groups.group_positions`): against a plain loop, through
the ranker's use of it, and on real DL19 rankings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core.groups import group_positions
from pipeline.core.ranking import query_groups, rank_by_score
from pipeline.datasets import trec_dl


def _loop(rows: list[tuple]) -> tuple[list[bool], list[int]]:
    """(first, 1-based position) by walking the rows; None never equals anything."""
    first, position = [], []
    for i, row in enumerate(rows):
        new = i == 0 or any(a is None or b is None or a != b for a, b in zip(row, rows[i - 1]))
        first.append(new)
        position.append(1 if new else position[-1] + 1)
    return first, position


def test_matches_a_loop_on_several_keys_with_nulls_and_chunks():
    rng = np.random.default_rng(3)
    a = sorted(rng.integers(0, 6, 300).tolist())
    b = rng.integers(0, 3, 300).tolist()
    b_sorted = [x for _, x in sorted(zip(a, b))]
    strings = [None if i % 37 == 5 else f"q{x}" for i, x in enumerate(a)]
    rows = list(zip(strings, b_sorted))
    key_a = pa.chunked_array(
        [pa.array(strings[:120]), pa.array(strings[120:])]
    )  # chunks cut mid-group
    key_b = np.array(b_sorted)
    groups = group_positions(key_a, key_b)
    first, position = _loop(rows)
    assert groups.first.tolist() == first
    assert groups.position.tolist() == position
    assert groups.starts.tolist() == [i for i, f in enumerate(first) if f]
    assert groups.sizes.sum() == len(rows) and (groups.sizes >= 1).all()
    assert (groups.group == np.cumsum(first) - 1).all()
    assert groups.position.dtype == np.int64 and groups.group.dtype == np.int64


def test_empty_single_and_bad_input():
    empty = group_positions(pa.array([], pa.string()))
    assert [len(x) for x in empty] == [0, 0, 0, 0, 0]
    one = group_positions(np.array([7]))
    assert (
        one.first.tolist() == [True] and one.position.tolist() == [1] and one.sizes.tolist() == [1]
    )
    with pytest.raises(ValueError, match="differ in length"):
        group_positions(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="at least one"):
        group_positions()


def test_the_ranker_keeps_the_first_of_each_pair_and_ranks_within_queries(shared_data):
    """The ranking stage's use (rank_rows): a repeated pair is dropped (the first in input order kept), null ids
    are never merged, and ranks count 1.. within each query by score, as a plain loop gives them."""
    from pipeline.rerank.stages.rank import rank_rows

    pairs, _ = trec_dl(2019, data_dir=shared_data)
    rng = np.random.default_rng(0)
    doc = pairs["doc_id"].to_pylist()
    doc[10] = doc[11]  # a repeated pair
    n = pairs.num_rows
    table = pa.table(
        {
            "query_id": pairs["query_id"],
            "doc_id": pa.array(doc, pairs["doc_id"].type),
            "score": pa.array(rng.normal(size=n).astype(np.float32)),
            "_row": pa.array(np.arange(n, dtype=np.int64)),
            "window": pa.array(np.zeros(n, np.int32)),
        }
    )
    ranked, duplicates, scored = rank_rows(table, None)
    assert duplicates["_row"].to_pylist() == [11] and scored == n - 1
    rows = sorted(ranked.to_pylist(), key=lambda r: (r["query_id"], -r["score"], r["doc_id"]))
    expected, last, k = [], None, 0
    for r in rows:
        k = k + 1 if r["query_id"] == last else 1
        last = r["query_id"]
        expected.append(k)
    assert [r["rank"] for r in rows] == expected and max(expected) == 100


def test_quality_rankings_on_dl19(shared_data):
    pairs, _ = trec_dl(2019, data_dir=shared_data)
    run = pairs.select(["query_id", "doc_id"]).append_column(
        "score", pc.negate(pairs["first_stage_rank"])
    )
    ranked = rank_by_score(run)
    assert ranked["rank"].to_pylist() == _loop([(q,) for q in ranked["query_id"].to_pylist()])[1]
    assert pc.all(pc.equal(ranked["rank"], pc.cast(pc.negate(ranked["score"]), pa.int32()))).as_py()
    qidx, starts, ids = query_groups(ranked["query_id"])
    assert (
        len(ids) == 43
        and len(starts) == 43
        and ids.to_pylist() == sorted(set(pairs["query_id"].to_pylist()))
    )
    assert (np.bincount(qidx) == 100).all()
