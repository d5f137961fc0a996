"""How far a contender's scores are from the fp32 reference's on the same pairs.

    fidelity(reference, scores, queries) -> {"max_abs_logit_diff", "spearman", "top10_overlap", "top10_queries"}

- `max_abs_logit_diff`: the largest |logit - reference logit| over the pairs (the numerical error);
- `spearman`: Spearman's rank correlation of the two score lists over all pairs (ranking agreement);
- `top10_overlap`: per query, the share of the reference's 10 best documents that are also among the row's
  10 best, averaged over the queries (what a reranker's user sees). Only queries with more than 10
  candidates count (with 10 or fewer, both top-10s are the whole list and agree by construction);
  `top10_queries` says how many counted (None: none had enough candidates).

Queries are groups of pairs sharing a query text (the workloads' pairs carry no other key to a contender).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

TOP_K = 10


def spearman(reference: np.ndarray, scores: np.ndarray) -> float:
    """Spearman's rho of two (n,) score arrays (ties get average ranks, as in scipy)."""
    if len(reference) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(reference)} reference scores")
    return float(spearmanr(reference, scores).statistic)


def top_k_overlap(
    reference: np.ndarray, scores: np.ndarray, queries: Sequence[str], k: int = TOP_K
) -> tuple[float | None, int]:
    """Mean per-query |top-k(reference) ∩ top-k(scores)| / k over the queries with more than k pairs, and
    how many queries that was. Ties break by position (a stable sort), the same way for both arrays."""
    if not len(reference) == len(scores) == len(queries):
        raise ValueError(
            f"{len(reference)} reference scores, {len(scores)} scores, {len(queries)} queries"
        )
    groups: dict[str, list[int]] = defaultdict(list)
    for i, query in enumerate(queries):
        groups[query].append(i)
    overlaps = []
    for rows in groups.values():
        if len(rows) <= k:
            continue
        rows = np.asarray(rows)
        best = lambda s: set(rows[np.argsort(-s[rows], kind="stable")[:k]].tolist())
        overlaps.append(len(best(reference) & best(scores)) / k)
    return (float(np.mean(overlaps)) if overlaps else None), len(overlaps)


def fidelity(reference: np.ndarray, scores: np.ndarray, queries: Sequence[str]) -> dict:
    """Every fidelity figure of `scores` against `reference` (all (n,), the same pairs in the same order)."""
    reference, scores = (
        np.asarray(reference, dtype=np.float64),
        np.asarray(scores, dtype=np.float64),
    )
    overlap, counted = top_k_overlap(reference, scores, queries)
    return {
        "max_abs_logit_diff": float(np.max(np.abs(scores - reference))),
        "spearman": spearman(reference, scores),
        "top10_overlap": overlap,
        "top10_queries": counted or None,
    }
