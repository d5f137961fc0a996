"""Positive-aware hard-negative selection over a scored candidate table: pure Arrow + numpy, no Ray, no model.

Input (long format, one row per (query, candidate); every query complete, so the function can also run on
any shard of whole queries):
    query_id, doc_id: string (integers are cast to string), document: string,
    score: float (the cross-encoder's raw logit; compared in float32),
    [first_stage_rank: int (1 = best)], [first_stage_score: float], [label: int, when no qrels are given],
    [query and other columns: ignored here, the projections read the texts]
Positives: a qrels table (query_id, doc_id, label); label >= `min_positive_label` is a positive. Without
one, the input's own `label` column says the same.

Output, the canonical long table (CANONICAL_SCHEMA), one row per input row, ordered by query_id, then
score descending, then doc_id (the rank order; ties in score broken by doc_id):
    query_id: string, doc_id: string,
    is_positive: bool            (a qrels/label positive, or the pseudo-positive)
    pseudo_positive: bool        (promoted by `pseudo_positive_min_score`, RocketQA-style)
    label: int32 | null          (the judgement, null when unjudged)
    first_stage_rank: int32 | null, first_stage_score: float64 | null,
    score: float32,
    pos_min_score: float32 | null (the query's lowest positive score; null when it has none)
    keep: bool                   (selected as a negative)
    drop_reason: string | null   (null exactly when keep)

drop_reason: the first rule that applies, in this order (DROP_REASONS). Why this order: the rules that stop
false negatives come first (a positive, or a copy of one, is reported as such even when it would also fail
the margin), then the input-side window, then the score rules in sentence-transformers' order, then sampling.
    no_positive                 the query has no positive among its candidates (the whole query is skipped)
    positive                    the candidate is a positive of its query (by doc_id, or the pseudo-positive)
    duplicate_of_positive       its normalized text equals a positive's text under another doc_id
    near_duplicate_of_positive  word n-gram Jaccard with a positive >= near_duplicate_threshold (opt-in)
    rank_window                 first_stage_rank <= range_min or > range_max
    margin                      score above pos_min - |pos_min| * relative_margin, or above
                                pos_min - absolute_margin
    max_score                   score > max_score
    min_score                   score < min_score
    not_sampled                 survived every rule, but the query's quota was filled by others
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.groups import group_positions
from pipeline.core.ranking import job_order
from pipeline.hard_negatives import dedup
from pipeline.hard_negatives.config import SelectionConfig

log = logging.getLogger(__name__)

IS_POSITIVE = "is_positive"
PSEUDO_POSITIVE = "pseudo_positive"
POS_MIN_SCORE = "pos_min_score"
KEEP = "keep"
DROP_REASON = "drop_reason"

NO_POSITIVE = "no_positive"
POSITIVE = "positive"
DUPLICATE_OF_POSITIVE = "duplicate_of_positive"
NEAR_DUPLICATE_OF_POSITIVE = "near_duplicate_of_positive"
RANK_WINDOW = "rank_window"
MARGIN = "margin"
MAX_SCORE = "max_score"
MIN_SCORE = "min_score"
NOT_SAMPLED = "not_sampled"
# Precedence order: a candidate's drop_reason is the first of these that applies.
DROP_REASONS = (
    NO_POSITIVE,
    POSITIVE,
    DUPLICATE_OF_POSITIVE,
    NEAR_DUPLICATE_OF_POSITIVE,
    RANK_WINDOW,
    MARGIN,
    MAX_SCORE,
    MIN_SCORE,
    NOT_SAMPLED,
)

CANONICAL_SCHEMA = pa.schema(
    [
        (schema.QUERY_ID, pa.string()),
        (schema.DOC_ID, pa.string()),
        (IS_POSITIVE, pa.bool_()),
        (PSEUDO_POSITIVE, pa.bool_()),
        (schema.LABEL, pa.int32()),
        (schema.FIRST_STAGE_RANK, pa.int32()),
        (schema.FIRST_STAGE_SCORE, pa.float64()),
        (schema.SCORE, pa.float32()),
        (POS_MIN_SCORE, pa.float32()),
        (KEEP, pa.bool_()),
        (DROP_REASON, pa.string()),
    ]
)

_KEY_SEPARATOR = "\x00"  # joins query_id and doc_id into one lookup key; cannot occur in a TREC id


def sample_order_key(seed: int, query_id: str, doc_id: str) -> int:
    """The random-sampling key: the first 8 bytes (big-endian) of sha256("{seed}\\x1f{query_id}\\x1f{doc_id}").

    A candidate's key depends only on these three values, so the sample is the same on any machine, in any
    process, and whatever the input's row order or sharding (unlike Python's salted hash() or a clock seed).
    """
    digest = hashlib.sha256(f"{seed}\x1f{query_id}\x1f{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def select_negatives(
    candidates: pa.Table, config: SelectionConfig, qrels: pa.Table | None = None
) -> pa.Table:
    """Label every candidate kept or dropped (with the reason); see the module docstring for the tables."""
    table = _prepare(candidates, config, qrels)
    n = table.num_rows
    if n == 0:
        return CANONICAL_SCHEMA.empty_table()

    score = table[schema.SCORE].to_numpy()  # float32, (n,)
    # Rows are sorted by query: group (n,) = the query's index, starts (num_queries,) = its first row.
    groups = group_positions(table[schema.QUERY_ID])
    group, starts, sizes = groups.group, groups.starts, groups.sizes

    is_positive, pseudo_positive, num_positives = _positives(table, score, starts, config)
    has_positive = (num_positives > 0)[group]  # (n,)
    pos_min = np.minimum.reduceat(
        np.where(is_positive, score, np.float32(np.inf)), starts
    )  # (num_queries,)
    pos_min_row = pos_min[group]  # (n,) +inf where the query has no positive

    reasons = [  # in the order of DROP_REASONS, up to not_sampled
        ~has_positive,
        is_positive,
        _duplicates_of_positives(table, is_positive, group),
        _near_duplicates_of_positives(table, is_positive, starts, sizes, config),
        _outside_rank_window(table, config),
        _within_margin(score, pos_min_row, config),
        *_outside_score_bounds(score, config),  # max_score, min_score
    ]
    reason_code = np.full(n, -1, dtype=np.int64)
    for code in reversed(range(len(reasons))):  # the earliest rule in DROP_REASONS wins
        reason_code[reasons[code]] = code
    survivor = reason_code < 0

    quota = np.array(
        [config.quota(int(p)) for p in num_positives], dtype=np.int64
    )  # (num_queries,)
    keep = _take_per_query(survivor, _sampling_order(table, config), group, quota)
    reason_code[survivor & ~keep] = DROP_REASONS.index(NOT_SAMPLED)

    reason_names = np.array(DROP_REASONS, dtype=object)[np.maximum(reason_code, 0)]
    columns = {
        schema.QUERY_ID: table[schema.QUERY_ID],
        schema.DOC_ID: table[schema.DOC_ID],
        IS_POSITIVE: pa.array(is_positive),
        PSEUDO_POSITIVE: pa.array(pseudo_positive),
        schema.LABEL: table[schema.LABEL],
        schema.FIRST_STAGE_RANK: table[schema.FIRST_STAGE_RANK],
        schema.FIRST_STAGE_SCORE: table[schema.FIRST_STAGE_SCORE],
        schema.SCORE: table[schema.SCORE],
        POS_MIN_SCORE: pa.array(pos_min_row, type=pa.float32(), mask=~has_positive),
        KEEP: pa.array(keep),
        DROP_REASON: pa.array(reason_names, type=pa.string(), mask=keep),
    }
    return pa.table(columns, schema=CANONICAL_SCHEMA)


def _positives(
    table: pa.Table, score: np.ndarray, starts: np.ndarray, config: SelectionConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_positive (n,), pseudo_positive (n,), positives per query (num_queries,)).

    A positive is judged at least `min_positive_label`; with `pseudo_positive_min_score`, a query without one
    has its top-scored candidate promoted when it scores at least that (RocketQA).
    """
    n = table.num_rows
    is_positive = pc.fill_null(
        pc.greater_equal(table[schema.LABEL], config.min_positive_label), False
    ).to_numpy(zero_copy_only=False)
    pseudo_positive = np.zeros(n, dtype=bool)
    num_positives = np.add.reduceat(is_positive.astype(np.int64), starts)
    if config.pseudo_positive_min_score is not None:
        # The first row of a query is its top-scored candidate (ties: lowest doc_id).
        promoted = starts[
            (num_positives == 0) & (score[starts] >= np.float32(config.pseudo_positive_min_score))
        ]
        pseudo_positive[promoted] = True
        is_positive = is_positive | pseudo_positive
        num_positives = np.add.reduceat(is_positive.astype(np.int64), starts)
    return is_positive, pseudo_positive, num_positives


def _duplicates_of_positives(
    table: pa.Table, is_positive: np.ndarray, group: np.ndarray
) -> np.ndarray:
    """Rows (not positives) whose normalized text equals a positive's of their query. -> bool (n,)"""
    n = table.num_rows
    hashes = dedup.text_hashes(table[schema.DOCUMENT].to_pylist())
    positive_texts = {
        (g, hashes[i]) for i, g in zip(np.flatnonzero(is_positive), group[is_positive].tolist())
    }
    duplicate = np.fromiter(
        ((g, h) in positive_texts for g, h in zip(group.tolist(), hashes)), dtype=bool, count=n
    )
    return duplicate & ~is_positive


def _near_duplicates_of_positives(
    table: pa.Table,
    is_positive: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    config: SelectionConfig,
) -> np.ndarray:
    """Rows (not positives) near-duplicating a positive of their query; none when the rule is off. -> bool (n,)"""
    if config.near_duplicate_threshold is None:
        return np.zeros(table.num_rows, dtype=bool)
    near_duplicate = _near_duplicates(
        table[schema.DOCUMENT].to_pylist(), is_positive, starts, sizes, config
    )
    return near_duplicate & ~is_positive


def _outside_rank_window(table: pa.Table, config: SelectionConfig) -> np.ndarray:
    """Rows whose first-stage rank is <= range_min or > range_max. -> bool (n,)"""
    rank_window = np.zeros(table.num_rows, dtype=bool)
    if config.range_min > 0 or config.range_max is not None:
        rank = table[schema.FIRST_STAGE_RANK].to_numpy(zero_copy_only=False)
        rank_window = rank <= config.range_min
        if config.range_max is not None:
            rank_window |= rank > config.range_max
    return rank_window


# Threshold arithmetic in float32, written as sentence-transformers writes it (torch float32 tensors), so
# candidates on the boundary fall on the same side: removed when score > threshold.
def _within_margin(
    score: np.ndarray, pos_min_row: np.ndarray, config: SelectionConfig
) -> np.ndarray:
    """Rows scoring above the relative or absolute margin below their query's lowest positive. -> bool (n,)"""
    margin = np.zeros(len(score), dtype=bool)
    with np.errstate(
        invalid="ignore"
    ):  # inf - inf for queries without a positive; those rows are no_positive
        if config.relative_margin is not None:
            margin |= score > pos_min_row - np.abs(pos_min_row) * np.float32(config.relative_margin)
        if config.absolute_margin is not None:
            margin |= score + np.float32(config.absolute_margin) > pos_min_row
    return margin


def _outside_score_bounds(
    score: np.ndarray, config: SelectionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(score > max_score, score < min_score), each bool (n,); all False for a bound that is not set."""
    n = len(score)
    above_max = (
        score > np.float32(config.max_score)
        if config.max_score is not None
        else np.zeros(n, dtype=bool)
    )
    below_min = (
        score < np.float32(config.min_score)
        if config.min_score is not None
        else np.zeros(n, dtype=bool)
    )
    return above_max, below_min


def _sampling_order(table: pa.Table, config: SelectionConfig) -> np.ndarray:
    """(n,) uint64 key the survivors are taken in: row order for "top", the sha256 sample key for "random"."""
    n = table.num_rows
    if config.sampling == "top":
        return np.arange(n, dtype=np.uint64)  # rows are already hardest-first within each query
    pairs = zip(table[schema.QUERY_ID].to_pylist(), table[schema.DOC_ID].to_pylist())
    return np.fromiter(
        (sample_order_key(config.seed, q, d) for q, d in pairs), dtype=np.uint64, count=n
    )


def _take_per_query(
    survivor: np.ndarray, order_key: np.ndarray, group: np.ndarray, quota: np.ndarray
) -> np.ndarray:
    """The first `quota[q]` survivors of each query q in `order_key` order (ties: row order). -> bool (n,)"""
    n = len(survivor)
    order = np.lexsort((np.arange(n), order_key, ~survivor, group))  # survivors first, then by key
    ordered_survivor = survivor[order]
    # Position among its query's survivors (0-based): rows of a query are contiguous in `order` too, survivors first.
    position = group_positions(group[order]).position - 1
    taken = np.zeros(n, dtype=bool)
    taken[order] = ordered_survivor & (position < quota[group[order]])
    return taken


def _near_duplicates(
    documents: list[str],
    is_positive: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    config: SelectionConfig,
) -> np.ndarray:
    """Rows whose word n-gram Jaccard with a positive of their query reaches the threshold. -> bool (n,)"""
    out = np.zeros(len(documents), dtype=bool)
    for start, size in zip(starts.tolist(), sizes.tolist()):
        rows = range(start, start + size)
        positives = [
            dedup.shingles(documents[i], config.near_duplicate_ngram)
            for i in rows
            if is_positive[i]
        ]
        if not positives:
            continue
        for i in rows:
            if not is_positive[i]:
                candidate = dedup.shingles(documents[i], config.near_duplicate_ngram)
                out[i] = any(
                    dedup.jaccard(candidate, p) >= config.near_duplicate_threshold
                    for p in positives
                )
    return out


def _prepare(candidates: pa.Table, config: SelectionConfig, qrels: pa.Table | None) -> pa.Table:
    """Validate and normalize the input: ids as strings, score float32, a `label` column, sorted rank order."""
    required = [schema.QUERY_ID, schema.DOC_ID, schema.DOCUMENT, schema.SCORE]
    missing = [c for c in required if c not in candidates.column_names]
    if missing:
        raise InputError(
            f"candidate table lacks column(s) {missing}; it has {candidates.column_names}. "
            f"Hard-negative selection needs {required} (score = the reranker's logit)"
        )
    columns = {
        schema.QUERY_ID: _id_column(candidates, schema.QUERY_ID),
        schema.DOC_ID: _id_column(candidates, schema.DOC_ID),
        schema.DOCUMENT: _not_null(candidates, schema.DOCUMENT).cast(pa.string()),
        schema.SCORE: _not_null(candidates, schema.SCORE).cast(pa.float32()),
    }
    if pc.any(pc.is_nan(columns[schema.SCORE])).as_py():
        raise InputError(
            "column `score` holds NaN; rescore those rows (the rerank job rejects pairs it "
            "cannot score) before selecting negatives"
        )
    window = config.range_min > 0 or config.range_max is not None
    for name, dtype in (
        (schema.FIRST_STAGE_RANK, pa.int32()),
        (schema.FIRST_STAGE_SCORE, pa.float64()),
    ):
        if name in candidates.column_names:
            columns[name] = candidates[name].cast(dtype)
        else:
            columns[name] = pa.nulls(candidates.num_rows, dtype)
    if window and columns[schema.FIRST_STAGE_RANK].null_count:
        raise InputError(
            "range_min/range_max select by first-stage rank, but column `first_stage_rank` is "
            "missing or has nulls; add the ranks or leave range_min=0 and range_max unset"
        )
    table = pa.table(columns)

    keys = _pair_keys(table)
    if pc.count_distinct(keys).as_py() != table.num_rows:
        counts = pc.value_counts(keys)
        repeated = (
            counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[:3].to_pylist()
        )
        raise InputError(
            f"(query_id, doc_id) pairs repeat in the candidates, e.g. "
            f"{[k.replace(_KEY_SEPARATOR, ' / ') for k in repeated]}; give each pair once"
        )
    table = table.append_column(schema.LABEL, _labels(candidates, qrels, keys))
    return table.sort_by(job_order())


def _labels(candidates: pa.Table, qrels: pa.Table | None, keys: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each candidate's judgement (int32, null when unjudged), from qrels or else the input's `label`."""
    if qrels is None:
        if schema.LABEL not in candidates.column_names:
            raise InputError(
                "no positives given: pass a qrels table (--positives) or an input column `label`"
            )
        return candidates[schema.LABEL].cast(pa.int32())
    if schema.LABEL in candidates.column_names:
        log.warning("the input's `label` column is ignored: positives come from the qrels table")
    missing = [
        c for c in (schema.QUERY_ID, schema.DOC_ID, schema.LABEL) if c not in qrels.column_names
    ]
    if missing:
        raise InputError(f"qrels table lacks column(s) {missing}; it has {qrels.column_names}")
    qrels = pa.table(
        {
            schema.QUERY_ID: _id_column(qrels, schema.QUERY_ID),
            schema.DOC_ID: _id_column(qrels, schema.DOC_ID),
            schema.LABEL: _not_null(qrels, schema.LABEL).cast(pa.int32()),
        }
    )
    qrel_keys = _pair_keys(qrels)
    if pc.count_distinct(qrel_keys).as_py() != qrels.num_rows:
        raise InputError(
            "the qrels judge some (query_id, doc_id) pair twice; keep one judgement per pair"
        )
    index = pc.index_in(keys, value_set=qrel_keys.combine_chunks())
    return pc.take(qrels[schema.LABEL], index)


def _pair_keys(table: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table[schema.QUERY_ID], table[schema.DOC_ID], _KEY_SEPARATOR)


def _not_null(table: pa.Table, name: str) -> pa.ChunkedArray:
    column = table[name]
    if column.null_count:
        raise InputError(
            f"column `{name}` has {column.null_count} null value(s); every row needs one"
        )
    return column


def _id_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    column = _not_null(table, name)
    if pa.types.is_integer(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if not pa.types.is_string(column.type):
        raise InputError(f"column `{name}` must hold strings or integers, got {column.type}")
    return column
