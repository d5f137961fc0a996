"""The two orders of a query's results, and why there are two.

The job's ranks (`job_order`): score descending, ties broken by doc_id ascending. The rank the rerank job
writes in ranked/ (and the order the hard-negative miner reads its candidates in) must come out the same
however the input was ordered and however the work was spread over shards, buckets and actors, so a tie
needs a rule that reads only the tied pairs themselves; doc_id ascending is the one the job's outputs have
always carried (a resumed output, a score-cache fill and the hard negatives' files are the same bytes as
before). The README documents it: `rank` is 1 = best, ties by doc_id.

trec_eval's (`trec_eval_order`): score descending, ties broken by doc_id descending. trec_eval ignores the
rank field of a run and orders each query's results itself: by score descending, ties broken by docno
descending in byte order (usnistgov/trec_eval, form_res_rels.c, `comp_sim_docno`: `strcmp(p2->docno,
p1->docno)`). Every measure here (pipeline/quality/) orders a run this way, ignoring its ranks, so that
its figures equal trec_eval's on the same run, tied scores included. Arrow compares strings by their UTF-8
bytes, like `strcmp`, so sorting on (query_id, score desc, doc_id desc) reproduces that order exactly; the
tests pin it on trec_eval's own expected outputs and on the DL19 SPLADE run, whose integer scores tie often.

The two differ only among tied scores: measuring the job's own output re-orders its ties trec_eval's way,
which is what trec_eval would do with the same file.

A list that only has ranks (no scores) is ordered by `score = -rank`, so ties in rank fall back to the same
doc_id rule.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.groups import group_positions
from pipeline.core.schema import DOC_ID, QUERY_ID, RANK, SCORE


def job_order(score_column: str = SCORE) -> list[tuple[str, str]]:
    """The job's rank order, as Arrow sort keys: (query_id asc, score desc, doc_id asc)."""
    return [(QUERY_ID, "ascending"), (score_column, "descending"), (DOC_ID, "ascending")]


def trec_eval_order(score_column: str = SCORE) -> list[tuple[str, str]]:
    """trec_eval's order, as Arrow sort keys: (query_id asc, score desc, doc_id desc)."""
    return [(QUERY_ID, "ascending"), (score_column, "descending"), (DOC_ID, "descending")]


def rank_by_score(table: pa.Table, score_column: str = SCORE, rank_column: str = RANK) -> pa.Table:
    """Rows in trec_eval's order (`trec_eval_order`), with `rank_column` (int32, 1 = best) set: how every
    evaluation ranks a run.

    table: (query_id, doc_id, <score_column>, ...) -> same columns (an existing `rank_column` replaced),
    sorted, plus `rank_column`. Scores must be non-null (callers reject null rows first).
    """
    order = pc.sort_indices(table, sort_keys=trec_eval_order(score_column))
    ranked = table.take(order)
    if rank_column in ranked.column_names:
        ranked = ranked.drop_columns([rank_column])
    rank = group_positions(ranked[QUERY_ID]).position
    return ranked.append_column(rank_column, pa.array(rank.astype(np.int32)))


def query_groups(query_ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Group ids of rows already sorted (or at least grouped) by query (`pipeline.core.groups.group_positions`).

    Returns qidx (N,) int64 = group of each row, starts (Q,) int64 = first row of each group,
    and the group's query ids (Q,) as a string array.
    """
    ids = query_ids.combine_chunks() if isinstance(query_ids, pa.ChunkedArray) else query_ids
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), pa.array([], pa.string())
    groups = group_positions(ids)
    return groups.group, groups.starts, ids.take(pa.array(groups.starts, pa.int64()))
