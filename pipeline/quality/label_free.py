"""Label-free measures: the cross-encoder as the judge of the first-stage retriever.

Where there are no judgements, the reranker's scores stand in for them. Every measure compares the
retriever's order of a query's candidates with the reranker's order of the same candidates:

- `judge/nDCG@k`: nDCG@k of the retriever's order with graded gains from the judge. The gain of a document is
  the judge's probability of relevance, sigmoid(score) for a cross-encoder that outputs logits (jina, bge and
  the BERT MS MARCO rerankers do; set `score_is_logit: false` for scores already in [0, 1]). The ideal ranking
  is the judge's own order of the query's candidates, so 1.0 means the retriever already ranks the top k as
  the judge would; 0.0 means it puts only documents the judge gives probability ~0 in its top k.
  Same discount and normalisation as the labelled nDCG (metrics.ndcg): gain / log2(rank + 1), cut at k.
- `judge/Overlap@k`: |retriever top k ∩ judge top k| / min(k, n).
- `judge/RBO(p=P)@D`: extrapolated rank-biased overlap (Webber, Moffat & Zobel 2010, "A similarity measure
  for indefinite rankings", eq. 30: both lists seen to the same depth L = min(D, n)):
  RBO_ext = X_L / L * p^L + (1 - p) / p * sum_{d=1..L} (X_d / d) * p^d, where X_d = overlap of the two
  depth-d prefixes. Identical rankings give exactly 1.
- `judge/Held<m>@k`: share of the judge's top m held in the retriever's top k: |judge top m ∩ retriever top k|
  / min(m, n). With k = the retrieval depth sent to the reranker this is 1 by construction, so pick k smaller
  (for example "would a top-50 retriever cut have kept the reranker's top 10?").
n is the number of candidates of the query. Orders follow trec_eval's rule (ranking.py): the judge's ties
are broken by doc_id descending.

A judge that is also the production reranker flatters itself: these numbers say how far the retriever is
from the reranker, not how good either is for users. The report says so next to them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import InputError
from pipeline.core.ranking import query_groups, rank_by_score
from pipeline.core.schema import DOC_ID, FIRST_STAGE_RANK, QUERY_ID, SCORE
from pipeline.quality.metrics import ndcg

RERANKER_RANK = "reranker_rank"
PREFIX = "judge/"
_RETRIEVER_KEY = "_retriever_key"


def judge_gain(score: np.ndarray, score_is_logit: bool = True) -> np.ndarray:
    """(N,) judge scores -> (N,) gains in [0, 1]: sigmoid of a logit, or the score itself (clipped)."""
    score = score.astype(np.float64)
    if score_is_logit:
        return 0.5 * (1.0 + np.tanh(0.5 * score))  # sigmoid, without overflow for large |score|
    return np.clip(score, 0.0, 1.0)


def _require_columns(table: pa.Table) -> None:
    missing = [
        c for c in (QUERY_ID, DOC_ID, FIRST_STAGE_RANK, SCORE) if c not in table.column_names
    ]
    if missing:
        raise InputError(
            f"label-free measures need columns {missing}; columns are {table.column_names}"
        )


def rank_both(table: pa.Table) -> pa.Table:
    """(query_id, doc_id, first_stage_rank, score, ...) -> same plus `reranker_rank`, sorted by (query, reranker_rank).

    The retriever's ranks are renumbered 1..n per query in their own order (ties by doc_id descending), so a
    run cut or filtered upstream still has gap-free ranks.
    """
    _require_columns(table)
    keyed = table.append_column(
        _RETRIEVER_KEY, pc.negate(table[FIRST_STAGE_RANK].cast(pa.float64()))
    )
    by_retriever = rank_by_score(keyed, score_column=_RETRIEVER_KEY, rank_column=FIRST_STAGE_RANK)
    both = rank_by_score(by_retriever, score_column=SCORE, rank_column=RERANKER_RANK)
    return both.drop_columns([_RETRIEVER_KEY])


def _rbo_ext(
    qidx: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray, p: float, depth: int
) -> np.ndarray:
    """(Q,) extrapolated RBO of two rankings of the same n_q items, to depth L_q = min(depth, n_q).

    A document joins the overlap X_d of both prefixes once d reaches the larger of its two ranks, so X is a
    per-query cumulative histogram of max(a, b): a (Q, depth + 1) matrix, fine for ~10^5 queries x 100.
    """
    num_queries = len(n)
    both = np.maximum(a, b)
    kept = both <= depth
    hist = np.zeros((num_queries, depth + 1))
    np.add.at(hist, (qidx[kept], both[kept]), 1.0)
    overlap = np.cumsum(hist, axis=1)  # (Q, depth + 1), overlap[:, d] = X_d
    d = np.arange(depth + 1, dtype=np.float64)
    length = np.minimum(n, depth)  # (Q,)
    in_range = (d[None, :] >= 1) & (d[None, :] <= length[:, None])
    weights = np.where(in_range, np.power(p, d)[None, :] / np.maximum(d, 1.0)[None, :], 0.0)
    summed = (overlap * weights).sum(axis=1)
    at_length = overlap[np.arange(num_queries), length]
    safe_length = np.maximum(length, 1)
    value = at_length / safe_length * np.power(p, length) + (1.0 - p) / p * summed
    return np.where(length > 0, value, 0.0)


def label_free_measures(
    table: pa.Table,
    cutoffs: list[int] = (10,),
    rbo_p: float = 0.9,
    rbo_depth: int = 100,
    held: list[tuple[int, int]] = ((10, 50),),
    score_is_logit: bool = True,
) -> pa.Table:
    """(query_id, doc_id, first_stage_rank, score) -> per-query table (query_id, judge/<measure>: float64 ...).

    `score` is the judge's (reranker's) score of each pair; `first_stage_rank` the retriever's rank.
    """
    if not 0.0 < rbo_p < 1.0:
        raise InputError(f"rbo_p must be in (0, 1), got {rbo_p}")
    _require_columns(table)
    ranked = rank_both(table.select([QUERY_ID, DOC_ID, FIRST_STAGE_RANK, SCORE]))
    qidx, _, query_ids = query_groups(ranked[QUERY_ID])
    num_queries = len(query_ids)
    retriever = ranked[FIRST_STAGE_RANK].to_numpy().astype(np.int64)
    judge = ranked[RERANKER_RANK].to_numpy().astype(np.int64)
    gain = judge_gain(ranked[SCORE].to_numpy(), score_is_logit)
    n = np.bincount(qidx, minlength=num_queries)

    def share(mask: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return (
            np.bincount(qidx, weights=mask.astype(np.float64), minlength=num_queries) / denominator
        )

    columns: dict[str, pa.Array] = {QUERY_ID: query_ids}
    for k in cutoffs:
        # Rows are in the judge's order, so (qidx, judge rank, gain) is already the ideal ranking.
        columns[f"{PREFIX}nDCG@{k}"] = ndcg(
            qidx, retriever, gain, qidx, judge, gain, num_queries, k
        )
        columns[f"{PREFIX}Overlap@{k}"] = share((retriever <= k) & (judge <= k), np.minimum(n, k))
    columns[f"{PREFIX}RBO(p={rbo_p:g})@{rbo_depth}"] = _rbo_ext(
        qidx, retriever, judge, n, rbo_p, rbo_depth
    )
    for top, k in held:
        columns[f"{PREFIX}Held{top}@{k}"] = share(
            (judge <= top) & (retriever <= k), np.minimum(n, top)
        )
    return pa.table(
        {
            name: pa.array(values, pa.float64()) if name != QUERY_ID else values
            for name, values in columns.items()
        }
    )


def score_summary(scores: pa.ChunkedArray | pa.Array) -> dict[str, float]:
    """Distribution of the judge's scores: count, mean, std, min, p01..p99, max."""
    values = pc.drop_null(scores).to_numpy(zero_copy_only=False).astype(np.float64)
    if len(values) == 0:
        return {"count": 0}
    quantiles = dict(
        zip(
            ("p01", "p10", "p25", "p50", "p75", "p90", "p99"),
            np.quantile(values, [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]),
        )
    )
    return {
        "count": int(len(values)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        **{k: float(v) for k, v in quantiles.items()},
        "max": float(values.max()),
    }
