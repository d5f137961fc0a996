"""Retrieval measures with judgements, computed as trec_eval computes them, vectorized over whole tables.

Names follow ir_measures notation; each equals a trec_eval measure:

    nDCG@k  = ndcg_cut_k     nDCG    = ndcg           P@k       = P_k        R@k    = recall_k
    AP      = map            AP@k    = map_cut_k      RR        = recip_rank Rprec  = Rprec
    Success@k = success_k    RR@k    = recip_rank counted only when the first relevant document is in the top k
    Judged@k  = 1 - unj_k    (fraction of the top min(k, retrieved) documents that have a judgement)

Conventions, pinned to trec_eval 9.0.x (usnistgov/trec_eval@f4253652; its expected outputs in
`../shared/data/trec-eval/` are the oracle of tests/quality/test_metrics_oracle.py):
- Order: trec_eval's, score descending, ties by doc_id descending (`ranking.trec_eval_order`; the rerank job
  writes its own ranks with ties by doc_id ascending, see ranking.py for why both); the run's rank field is ignored.
- Relevant, for the binary measures (P, R, RR, AP, Success, Rprec): label >= `relevance_level` (trec_eval `-l`,
  default 1). R is the number of the query's judged documents with label >= `relevance_level`.
- nDCG: gain = label where label > 0, whatever `relevance_level` is; discount log2(rank + 1); the ideal DCG
  ranks *all* judged documents of the query (not only the retrieved ones) by label and is cut at the same k.
- Unjudged: a retrieved document missing from the qrels, or judged with a negative label (trec_eval's "in pool
  but unjudged"), is non-relevant with gain 0, and does not count for Judged@k.
- Cut-offs past the end of a ranking: the missing positions are non-relevant (P@10 of a 5-document ranking
  divides by 10). Judged@k divides by min(k, retrieved), like ir_measures, so a short fully judged list is 1.
- Queries: by default only queries present in both the run and the qrels are evaluated and averaged, which is
  trec_eval's default (queries the run lacks are skipped, queries the qrels lack are ignored). With
  `complete_queries=True` (trec_eval `-c`) every qrels query counts, a missing one scoring 0 on every measure.
- A query with judgements but no relevant document scores 0 on R, AP, Rprec and nDCG (no division by zero)
  and is still averaged, as in trec_eval.
The Python wrappers differ from this on ties (ir_measures' Judged sorts doc_id ascending), on missing queries
and on gains (some use 2^label - 1); that is why the code is ours and pinned to trec_eval's outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import InputError
from pipeline.core.groups import group_positions
from pipeline.core.ranking import rank_by_score
from pipeline.core.schema import DOC_ID, LABEL, QUERY_ID, RANK, SCORE

# name -> whether a cut-off is required (True), optional (None) or not allowed (False)
MEASURES: dict[str, bool | None] = {
    "nDCG": None,
    "RR": None,
    "AP": None,
    "P": True,
    "R": True,
    "Success": True,
    "Judged": True,
    "Rprec": False,
}
_MEASURE_RE = re.compile(r"^(?P<name>[A-Za-z]+)(?:@(?P<cutoff>\d+))?$")


@dataclass(frozen=True)
class Measure:
    """A measure in ir_measures notation: `nDCG@10` -> Measure("nDCG", 10), `AP` -> Measure("AP", None)."""

    name: str
    cutoff: int | None = None

    def __str__(self) -> str:
        return self.name if self.cutoff is None else f"{self.name}@{self.cutoff}"


def parse_measure(text: str) -> Measure:
    match = _MEASURE_RE.match(text.strip())
    known = ", ".join(
        f"{n}@k" if c else (f"{n}[@k]" if c is None else n) for n, c in MEASURES.items()
    )
    if not match or match["name"] not in MEASURES:
        raise InputError(
            f"unknown measure {text!r}; known measures: {known} (ir_measures notation)"
        )
    name, cutoff = match["name"], int(match["cutoff"]) if match["cutoff"] else None
    need = MEASURES[name]
    if need is True and cutoff is None:
        raise InputError(f"measure {text!r} needs a cut-off, for example `{name}@10`")
    if need is False and cutoff is not None:
        raise InputError(f"measure {text!r} takes no cut-off; write `{name}`")
    if cutoff is not None and cutoff < 1:
        raise InputError(f"measure {text!r}: the cut-off must be at least 1")
    return Measure(name, cutoff)


@dataclass
class JudgedRanking:
    """A run ranked the trec_eval way and joined with its qrels; the arrays every measure is computed from.

    Retrieved rows are sorted by (query, rank); Q = number of evaluated queries, N = retrieved rows,
    M = judged documents with a positive label (the ideal ranking).
    """

    query_ids: pa.Array  # (Q,) string, ascending
    qidx: np.ndarray  # (N,) int64, query of each retrieved row
    rank: np.ndarray  # (N,) int64, 1 = best within its query
    label: np.ndarray  # (N,) float64, NaN = not in the qrels
    num_ret: np.ndarray  # (Q,) int64
    num_rel: np.ndarray  # (Q,) int64, judged documents with label >= relevance_level
    ideal_qidx: np.ndarray  # (M,) int64
    ideal_rank: np.ndarray  # (M,) int64, position in the query's ideal ranking
    ideal_gain: np.ndarray  # (M,) float64, sorted descending within each query
    relevance_level: int

    @property
    def relevant(
        self,
    ) -> np.ndarray:  # (N,) bool; NaN >= level is False, so unjudged rows are non-relevant
        return self.label >= self.relevance_level

    @property
    def judged(self) -> np.ndarray:  # (N,) bool
        return self.label >= 0

    @property
    def gain(self) -> np.ndarray:  # (N,) float64
        return np.where(self.label > 0, self.label, 0.0)


def judge_run(
    run: pa.Table,
    qrels: pa.Table,
    relevance_level: int = 1,
    complete_queries: bool = False,
    require_judged: bool = True,
) -> JudgedRanking:
    """run (query_id, doc_id, score) + qrels (query_id, doc_id, label) -> JudgedRanking.

    Raises InputError when no query of the run is judged (almost always mismatched query ids), unless
    `require_judged` is false (one part of a run, whose other parts may hold the judged queries).
    """
    run = run.select([QUERY_ID, DOC_ID, SCORE])
    qrels = qrels.select([QUERY_ID, DOC_ID, LABEL])
    qrels_queries = pc.unique(qrels[QUERY_ID])
    run_queries = pc.unique(run[QUERY_ID])
    universe = (
        qrels_queries
        if complete_queries
        else run_queries.filter(pc.is_in(run_queries, qrels_queries))
    )
    universe = universe.take(pc.sort_indices(universe))
    if require_judged and (
        len(universe) == 0 or not pc.any(pc.is_in(run[QUERY_ID], universe)).as_py()
    ):
        raise InputError(
            f"no query of the run has judgements in the qrels (run query ids like "
            f"{run_queries[:3].to_pylist()}, qrels query ids like {qrels_queries[:3].to_pylist()}); "
            "check that both use the same query ids"
        )

    run = run.filter(pc.is_in(run[QUERY_ID], universe))
    joined = rank_by_score(run.join(qrels, keys=[QUERY_ID, DOC_ID], join_type="left outer"))
    qidx = pc.index_in(joined[QUERY_ID], universe).to_numpy().astype(np.int64)
    label = joined[LABEL].cast(pa.float64()).fill_null(np.nan).to_numpy()

    qrels = qrels.filter(pc.is_in(qrels[QUERY_ID], universe))
    q_of_judgement = pc.index_in(qrels[QUERY_ID], universe).to_numpy().astype(np.int64)
    judgement = qrels[LABEL].to_numpy().astype(np.float64)
    num_queries = len(universe)
    positive = judgement > 0
    order = np.lexsort((-judgement[positive], q_of_judgement[positive]))
    ideal_qidx = q_of_judgement[positive][order]
    return JudgedRanking(
        query_ids=universe,
        qidx=qidx,
        rank=joined[RANK].to_numpy().astype(np.int64),
        label=label,
        num_ret=np.bincount(qidx, minlength=num_queries),
        num_rel=np.bincount(q_of_judgement[judgement >= relevance_level], minlength=num_queries),
        ideal_qidx=ideal_qidx,
        ideal_rank=group_positions(ideal_qidx).position,
        ideal_gain=judgement[positive][order],
        relevance_level=relevance_level,
    )


def _per_query_sum(qidx: np.ndarray, weights: np.ndarray, num_queries: int) -> np.ndarray:
    return np.bincount(qidx, weights=weights.astype(np.float64), minlength=num_queries)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0 where the denominator is 0 (trec_eval's convention)."""
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def dcg(
    qidx: np.ndarray, rank: np.ndarray, gain: np.ndarray, num_queries: int, cutoff: int | None
) -> np.ndarray:
    """(N,) rows -> (Q,) sum of gain / log2(rank + 1) over rank <= cutoff (all ranks when cutoff is None)."""
    kept = rank <= cutoff if cutoff is not None else np.ones(len(rank), bool)
    return _per_query_sum(qidx[kept], gain[kept] / np.log2(rank[kept] + 1.0), num_queries)


def ndcg(
    qidx: np.ndarray,
    rank: np.ndarray,
    gain: np.ndarray,
    ideal_qidx: np.ndarray,
    ideal_rank: np.ndarray,
    ideal_gain: np.ndarray,
    num_queries: int,
    cutoff: int | None,
) -> np.ndarray:
    """(Q,) DCG@k of the ranking divided by DCG@k of the ideal ranking; 0 when the ideal DCG is 0.

    Works for any non-negative gains (labels here, the judge's probabilities in label_free.py).
    """
    ideal = dcg(ideal_qidx, ideal_rank, ideal_gain, num_queries, cutoff)
    return _divide(dcg(qidx, rank, gain, num_queries, cutoff), ideal)


def measure_values(j: JudgedRanking, measure: Measure) -> np.ndarray:
    """(Q,) values of one measure for every evaluated query, in `j.query_ids` order."""
    num_queries, k, name = len(j.query_ids), measure.cutoff, measure.name
    in_top_k = j.rank <= k if k is not None else np.ones(len(j.rank), bool)
    relevant = j.relevant

    def count(mask: np.ndarray) -> np.ndarray:
        return _per_query_sum(j.qidx, mask, num_queries)

    if name == "P":
        return count(relevant & in_top_k) / k
    if name == "R":
        return _divide(count(relevant & in_top_k), j.num_rel)
    if name == "Success":
        return (count(relevant & in_top_k) > 0).astype(np.float64)
    if name == "Rprec":
        return _divide(count(relevant & (j.rank <= j.num_rel[j.qidx])), j.num_rel)
    if name == "RR":
        first = np.full(num_queries, np.inf)
        np.minimum.at(first, j.qidx[relevant & in_top_k], j.rank[relevant & in_top_k])
        return 1.0 / first  # 1/inf = 0: no relevant document (in the top k)
    if name == "AP":
        # Precision at each relevant row = relevant rows so far in its query / rank. Ranks are 1..n without
        # gaps, so the query's first row is `row - rank + 1` and a global cumsum can be re-based per query.
        seen = np.cumsum(relevant)
        first_row = np.arange(len(j.rank)) - j.rank + 1
        relevant_so_far = seen - (seen - relevant)[first_row]
        precision = np.where(relevant & in_top_k, relevant_so_far / j.rank, 0.0)
        return _divide(_per_query_sum(j.qidx, precision, num_queries), j.num_rel)
    if name == "nDCG":
        return ndcg(
            j.qidx, j.rank, j.gain, j.ideal_qidx, j.ideal_rank, j.ideal_gain, num_queries, k
        )
    if name == "Judged":
        return _divide(count(j.judged & in_top_k), np.minimum(j.num_ret, k))
    raise AssertionError(f"measure {name} is listed in MEASURES but not computed")


def evaluate(
    run: pa.Table,
    qrels: pa.Table,
    measures: list[str | Measure],
    relevance_level: int = 1,
    complete_queries: bool = False,
    require_judged: bool = True,
) -> pa.Table:
    """run (query_id, doc_id, score) x qrels (query_id, doc_id, label) -> per-query table.

    Returns (query_id: string, <measure>: float64 ...), one row per evaluated query (see the module docstring
    for which queries), one column per measure named in ir_measures notation (`nDCG@10`).
    """
    parsed = [m if isinstance(m, Measure) else parse_measure(m) for m in measures]
    judged = judge_run(run, qrels, relevance_level, complete_queries, require_judged)
    columns = {QUERY_ID: judged.query_ids}
    for measure in parsed:
        columns[str(measure)] = pa.array(measure_values(judged, measure), pa.float64())
    return pa.table(columns)


def means(per_query: pa.Table) -> dict[str, float]:
    """{measure: mean over queries} for every float column of a per-query table."""
    return {
        name: float(pc.mean(per_query[name]).as_py() or 0.0)
        for name in per_query.column_names
        if pa.types.is_floating(per_query.schema.field(name).type)
    }
