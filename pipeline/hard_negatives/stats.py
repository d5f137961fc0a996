"""stats.json and the printed summary, computed from the canonical table so every count reconciles with it:
rows == kept_negatives + sum(drop_reasons), and each query is counted once in `queries`.

    rows, positives, kept_negatives, drop_reasons {reason: rows} (every reason, zeros included)
    queries: in, with_positive, with_pseudo_positive, skipped_no_positive, with_full_quota (>= their quota of
             negatives), short (a positive but fewer negatives than the quota; never padded), without_negatives
    negatives_per_query {kept negatives: queries}, over the queries with a positive
    scores: positives, kept_negatives, margin (the query's pos_min_score - the negative's score):
            count, mean, std, min, p25, p50, p75, max
    qrels (when a qrels table was given): queries_without_candidates (queries with a positive judgement and no
             candidate row), positives_not_in_candidates (positive judgements of queries that have candidates,
             whose document was not retrieved: unscored, so unusable)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.hard_negatives.config import SelectionConfig
from pipeline.hard_negatives.select import (
    DROP_REASON,
    DROP_REASONS,
    IS_POSITIVE,
    KEEP,
    NO_POSITIVE,
    POS_MIN_SCORE,
    PSEUDO_POSITIVE,
)


def distribution(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0}
    values = values.astype(np.float64)
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    summary = {
        "mean": values.mean(),
        "std": values.std(),
        "min": values.min(),
        "p25": p25,
        "p50": p50,
        "p75": p75,
        "max": values.max(),
    }
    return {"count": int(len(values)), **{k: round(float(v), 6) for k, v in summary.items()}}


def compute_stats(
    canonical: pa.Table, selection: SelectionConfig, qrels: pa.Table | None = None
) -> dict:
    return reduce_stats([stats_piece(canonical, selection, qrels)], selection, qrels)


def stats_piece(
    canonical: pa.Table, selection: SelectionConfig, qrels: pa.Table | None = None
) -> dict:
    """The additive part of the stats of a table of whole queries (a bucket), plus the scores the
    distributions need (a few per query: positives and kept negatives). Pieces of disjoint queries reduce
    to the stats of their union (`reduce_stats`). qrels: the judgements of these queries, or all of them."""
    is_positive = canonical[IS_POSITIVE].to_numpy()
    keep = canonical[KEEP].to_numpy()
    score = canonical[schema.SCORE].to_numpy()
    reasons = Counter(canonical[DROP_REASON].drop_null().to_pylist())
    per_query = canonical.group_by(schema.QUERY_ID).aggregate(
        [
            (IS_POSITIVE, "sum"),
            (PSEUDO_POSITIVE, "sum"),
            (KEEP, "sum"),
        ]
    )
    positives = per_query[f"{IS_POSITIVE}_sum"].to_numpy()
    kept = per_query[f"{KEEP}_sum"].to_numpy()
    quota = np.array([selection.quota(int(p)) for p in positives], dtype=np.int64)
    with_positive = positives > 0
    skipped = canonical.filter(pc.equal(canonical[DROP_REASON], NO_POSITIVE))[
        schema.QUERY_ID
    ].unique()
    piece = {
        "rows": canonical.num_rows,
        "positives": int(is_positive.sum()),
        "kept_negatives": int(keep.sum()),
        "drop_reasons": {reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        "queries": {
            "in": per_query.num_rows,
            "with_positive": int(with_positive.sum()),
            "with_pseudo_positive": int((per_query[f"{PSEUDO_POSITIVE}_sum"].to_numpy() > 0).sum()),
            "skipped_no_positive": len(skipped),
            "with_full_quota": int((with_positive & (kept >= quota)).sum()),
            "short": int((with_positive & (kept < quota)).sum()),
            "without_negatives": int((with_positive & (kept == 0)).sum()),
        },
        "negatives_per_query": {
            str(k): v for k, v in Counter(kept[with_positive].tolist()).items()
        },
        "values": {
            "positives": score[is_positive].tolist(),
            "kept_negatives": score[keep].tolist(),
            "margin": (
                canonical[POS_MIN_SCORE].to_numpy(zero_copy_only=False)[keep] - score[keep]
            ).tolist(),
        },
    }
    if qrels is not None:
        piece["qrels"] = _qrels_coverage(canonical, qrels, selection)
    return piece


def reduce_stats(
    pieces: list[dict], selection: SelectionConfig, qrels: pa.Table | None = None
) -> dict:
    """stats.json's figures from the pieces of disjoint sets of queries. The distributions are computed over
    the sorted scores, so the result is the same whatever the pieces' number and order."""

    def total(get) -> int:
        return sum(get(p) for p in pieces)

    per_query: Counter = Counter()
    for p in pieces:
        per_query.update({int(k): v for k, v in p["negatives_per_query"].items()})
    values = {
        name: np.sort(
            np.concatenate(
                [np.asarray(p["values"][name], dtype=np.float32) for p in pieces]
                or [np.zeros(0, np.float32)]
            )
        )
        for name in ("positives", "kept_negatives", "margin")
    }
    stats = {
        "rows": total(lambda p: p["rows"]),
        "positives": total(lambda p: p["positives"]),
        "kept_negatives": total(lambda p: p["kept_negatives"]),
        "drop_reasons": {
            reason: total(lambda p: p["drop_reasons"][reason]) for reason in DROP_REASONS
        },
        "queries": {
            name: total(lambda p: p["queries"][name])
            for name in (
                "in",
                "with_positive",
                "with_pseudo_positive",
                "skipped_no_positive",
                "with_full_quota",
                "short",
                "without_negatives",
            )
        },
        "quota": {
            "num_negatives": selection.num_negatives,
            "negatives_per": selection.negatives_per,
        },
        "negatives_per_query": {str(k): v for k, v in sorted(per_query.items())},
        "scores": {name: distribution(v) for name, v in values.items()},
    }
    if qrels is not None:
        # A query lives in one piece, so the positive queries with candidates add up across pieces.
        positive = qrels.filter(pc.greater_equal(qrels[schema.LABEL], selection.min_positive_label))
        judged = len(pc.unique(positive[schema.QUERY_ID].cast(pa.string())))
        stats["qrels"] = {
            "queries_without_candidates": judged
            - total(lambda p: p["qrels"]["positive_queries_with_candidates"]),
            "positives_not_in_candidates": total(
                lambda p: p["qrels"]["positives_not_in_candidates"]
            ),
        }
    return stats


def _qrels_coverage(canonical: pa.Table, qrels: pa.Table, selection: SelectionConfig) -> dict:
    positive = qrels.filter(pc.greater_equal(qrels[schema.LABEL], selection.min_positive_label))
    query_ids = positive[schema.QUERY_ID].cast(pa.string())
    doc_ids = positive[schema.DOC_ID].cast(pa.string())
    has_candidates = pc.is_in(query_ids, value_set=canonical[schema.QUERY_ID].unique())
    pair = lambda q, d: pc.binary_join_element_wise(q, d, "\x00")
    retrieved = pc.is_in(
        pair(query_ids, doc_ids),
        value_set=pair(canonical[schema.QUERY_ID], canonical[schema.DOC_ID]).combine_chunks(),
    )
    return {
        "positive_queries_with_candidates": len(pc.unique(query_ids.filter(has_candidates))),
        "positives_not_in_candidates": int(
            pc.sum(pc.and_(has_candidates, pc.invert(retrieved))).as_py() or 0
        ),
    }


def format_summary(stats: dict) -> str:
    """The few lines a user reads after a run."""
    q = stats["queries"]
    run = stats.get("run", {})
    lines = [f"model: {run['model']}"] if run.get("model") else []
    if run.get("random_weights"):
        lines.append(
            f"RANDOM WEIGHTS: {run['model']} has random weights; its scores, and the negatives chosen by "
            "them, mean nothing"
        )
    lines += [
        f"queries in: {q['in']:,}; with a positive: {q['with_positive']:,} "
        f"(pseudo-positive: {q['with_pseudo_positive']:,}); skipped without a positive: {q['skipped_no_positive']:,}",
        f"queries with their full quota of {stats['quota']['num_negatives']} negative(s) per "
        f"{stats['quota']['negatives_per']}: {q['with_full_quota']:,}; short: {q['short']:,} "
        f"(none: {q['without_negatives']:,}; never padded)",
        f"candidates: {stats['rows']:,} = {stats['kept_negatives']:,} kept as negatives "
        f"+ {stats['rows'] - stats['kept_negatives']:,} dropped, by reason:",
    ]
    lines += [
        f"  {reason:<28} {count:>10,}" for reason, count in stats["drop_reasons"].items() if count
    ]
    lines.append(f"  {'metric':<8} {'positives':>12} {'negatives':>12} {'margin':>12}")
    scores = stats["scores"]
    for metric in ("count", "mean", "std", "min", "p25", "p50", "p75", "max"):
        cells = [scores[name].get(metric) for name in ("positives", "kept_negatives", "margin")]
        cells = [
            "" if c is None else (f"{c:,}" if metric == "count" else f"{c:.4f}") for c in cells
        ]
        lines.append(f"  {metric:<8} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12}")
    if "qrels" in stats:
        lines.append(
            f"qrels: {stats['qrels']['queries_without_candidates']:,} queries with a positive have no "
            f"candidates; {stats['qrels']['positives_not_in_candidates']:,} positives were not retrieved"
        )
    for name, count in stats.get("projections", {}).items():
        lines.append(f"{name}: {count:,}")
    return "\n".join(lines)
