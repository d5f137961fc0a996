"""Label-free measures with the reranker as judge: definitions checked on small cases and a loop reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import InputError
from pipeline.quality.label_free import judge_gain, label_free_measures, rank_both, score_summary


def _table(query_ids, first_stage_ranks, scores):
    return pa.table(
        {
            "query_id": query_ids,
            "doc_id": [f"d{r}" for r in first_stage_ranks],
            "first_stage_rank": pa.array(first_stage_ranks, pa.int32()),
            "score": pa.array(scores, pa.float64()),
        }
    )


def _rbo_reference(a: list[str], b: list[str], p: float, depth: int) -> float:
    """Webber et al. 2010, eq. 30, written as the paper states it: prefix sets, one depth at a time."""
    length = min(depth, len(a))
    overlap = [len(set(a[:d]) & set(b[:d])) for d in range(1, length + 1)]
    return overlap[-1] / length * p**length + (1 - p) / p * sum(
        x / d * p**d for d, x in enumerate(overlap, 1)
    )


def test_identical_orders_agree_perfectly():
    table = _table(["q"] * 30, list(range(1, 31)), list(np.linspace(5, -5, 30)))
    row = label_free_measures(
        table, cutoffs=[10], rbo_p=0.9, rbo_depth=100, held=[(10, 10)]
    ).to_pylist()[0]
    assert row["judge/nDCG@10"] == pytest.approx(1.0)
    assert row["judge/Overlap@10"] == 1.0
    assert row["judge/RBO(p=0.9)@100"] == pytest.approx(1.0, abs=1e-12)
    assert row["judge/Held10@10"] == 1.0


def test_reversed_order_hand_values():
    # 20 candidates, the judge ranks them in the opposite order of the retriever.
    n = 20
    scores = np.linspace(-8.0, 8.0, n)  # retriever rank 1 gets the judge's lowest score
    row = label_free_measures(
        _table(["q"] * n, list(range(1, n + 1)), list(scores)), cutoffs=[10], held=[(5, 15)]
    ).to_pylist()[0]
    assert row["judge/Overlap@10"] == 0.0
    assert row["judge/Held5@15"] == 0.0  # judge's top 5 = retriever's ranks 16..20
    gain = judge_gain(scores)
    discount = np.log2(np.arange(2, 12))
    assert row["judge/nDCG@10"] == pytest.approx(
        (gain[:10] / discount).sum() / (gain[::-1][:10] / discount).sum()
    )
    assert row["judge/nDCG@10"] < 0.1


def test_rbo_matches_the_papers_formula_on_random_permutations():
    rng = np.random.default_rng(7)
    query_ids, ranks, scores, references = [], [], [], {}
    for q, n in enumerate([1, 3, 17, 60, 150]):
        judge_scores = rng.normal(size=n)
        retriever = [f"d{r}" for r in range(1, n + 1)]
        judge = [retriever[i] for i in np.argsort(-judge_scores, kind="stable")]
        references[str(q)] = _rbo_reference(retriever, judge, 0.8, 100)
        query_ids += [str(q)] * n
        ranks += list(range(1, n + 1))
        scores += list(judge_scores)
    rows = label_free_measures(
        _table(query_ids, ranks, scores), rbo_p=0.8, rbo_depth=100
    ).to_pylist()
    for row in rows:
        assert row["judge/RBO(p=0.8)@100"] == pytest.approx(references[row["query_id"]], abs=1e-12)


def test_judge_ndcg_uses_sigmoid_gains_and_the_judges_order_as_ideal():
    scores = [-1.0, 2.0, 0.0]  # the judge prefers retriever rank 2, then 3, then 1
    row = label_free_measures(_table(["q"] * 3, [1, 2, 3], scores), cutoffs=[2]).to_pylist()[0]
    gain = judge_gain(np.array(scores))
    dcg = gain[0] + gain[1] / np.log2(3)
    ideal = gain[1] + gain[2] / np.log2(3)
    assert row["judge/nDCG@2"] == pytest.approx(dcg / ideal)
    assert judge_gain(np.array([0.0, 800.0, -800.0])).tolist() == [0.5, 1.0, 0.0]  # no overflow


def test_retriever_ranks_with_gaps_are_renumbered_and_queries_kept_apart():
    table = _table(["a", "a", "b", "b"], [3, 7, 1, 2], [0.0, 1.0, 5.0, 4.0])
    ranked = rank_both(table).to_pylist()
    assert [(r["query_id"], r["first_stage_rank"], r["reranker_rank"]) for r in ranked] == [
        ("a", 2, 1),
        ("a", 1, 2),
        ("b", 1, 1),
        ("b", 2, 2),
    ]


def test_real_dl19_candidates_with_a_label_aware_judge(dl19_long):
    # The fixture's judge agrees with the qrels, so it must disagree with BM25 clearly but not totally.
    table = pq.read_table(
        dl19_long, columns=["query_id", "doc_id", "first_stage_rank", "reranker_score"]
    )
    table = table.rename_columns(["query_id", "doc_id", "first_stage_rank", "score"])
    per_query = label_free_measures(table, cutoffs=[10], held=[(10, 100), (10, 50)])
    assert per_query.num_rows == 43
    held_all = per_query["judge/Held10@100"].to_numpy()
    assert np.all(held_all == 1.0)  # every candidate is in the retriever's top 100, by construction
    overlap = per_query["judge/Overlap@10"].to_numpy()
    assert 0.1 < overlap.mean() < 0.6
    summary = score_summary(table["score"])
    assert summary["count"] == 4300 and summary["min"] <= summary["p50"] <= summary["max"]


def test_missing_columns_are_named():
    with pytest.raises(InputError, match=r"\['first_stage_rank'\]"):
        label_free_measures(pa.table({"query_id": ["q"], "doc_id": ["d"], "score": [1.0]}))
