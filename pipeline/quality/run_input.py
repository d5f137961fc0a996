"""The index-quality job's `--run`: a TREC run file or the rerank job's Parquet input, as one table.

Accepted:
- TREC run text (`qid Q0 docno rank score tag`): ordered by score, as trec_eval does (pipeline/core/trec.py).
- Parquet, long format (one row per pair: query_id, doc_id, [query, document], first-stage rank and/or score,
  any carried columns such as language), a file or a folder of files.
- Parquet, grouped format (one row per query: query_id, [query], candidates: list<struct<doc_id, ...>>);
  the candidates are exploded to one row per pair, their struct fields becoming columns.

The first-stage order comes from the first of these columns that exists: `first_stage_score`,
`first_stage_rank`, `score`, `rank` (a score orders descending, a rank ascending; ties by doc_id descending
as in trec_eval). The `first_stage_*` names win so that the rerank job's *output* (whose `score`/`rank` are the
reranker's) can be passed as well. `input.score_column` / `input.rank_column` pick other columns explicitly.

Output, `RunInput.pairs`: (query_id: string, doc_id: string, score: float64 = first-stage order key,
first_stage_rank: int32 = trec_eval rank 1..n, [judge_score: float64], [segment columns], [query, document]),
sorted by (query_id, first_stage_rank). Rows with a null id or a null/NaN order key go to `RunInput.rejected`
(input columns + reason); a (query_id, doc_id) pair listed twice is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import InputError
from pipeline.core.ranking import rank_by_score
from pipeline.core.schema import (
    CANDIDATES,
    DOC_ID,
    DOCUMENT,
    FIRST_STAGE_RANK,
    FIRST_STAGE_SCORE,
    QUERY,
    QUERY_ID,
    RANK,
    REASON,
    SCORE,
)
from pipeline.core.storage import url_to_fs
from pipeline.core.trec import is_parquet, read_run

JUDGE_SCORE = "judge_score"
ORDER_COLUMNS = (FIRST_STAGE_SCORE, FIRST_STAGE_RANK, SCORE, RANK)


@dataclass
class RunInput:
    pairs: pa.Table
    rejected: pa.Table
    order_column: str  # which input column gave the first-stage order


def _explode_grouped(table: pa.Table) -> pa.Table:
    """One row per query with `candidates: list<struct>` -> one row per (query, candidate)."""
    candidates = table[CANDIDATES].combine_chunks()
    if not pa.types.is_list(candidates.type) and not pa.types.is_large_list(candidates.type):
        raise InputError(f"column `{CANDIDATES}` must be a list of structs, got {candidates.type}")
    parents = pc.list_parent_indices(candidates)
    flat = pc.list_flatten(candidates)
    if not pa.types.is_struct(flat.type):
        raise InputError(
            f"column `{CANDIDATES}` must be a list of structs (doc_id, ...), got {candidates.type}"
        )
    per_query = table.drop_columns([CANDIDATES]).take(parents)
    for i, field in enumerate(flat.type):
        per_query = per_query.append_column(field.name, flat.field(i))
    return per_query


def _read_parquet_run(uri: str, storage_options: dict | None) -> pa.Table:
    fs, path = url_to_fs(uri, storage_options)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"run {uri!r} cannot be read as Parquet: {e}") from None
    if CANDIDATES in table.column_names:
        table = _explode_grouped(table)
    return table


def _order_column(
    table, score_column: str | None, rank_column: str | None, judge: str | None
) -> tuple[str, bool]:
    """(column giving the first-stage order, whether it is a score, i.e. higher = better). `table`: anything
    with `column_names` (a table, or a schema's names as `RunColumns`)."""
    for column in (score_column, rank_column):
        if column and column not in table.column_names:
            raise InputError(
                f"run column `{column}` (from input config) not found; columns are {table.column_names}"
            )
    if score_column:
        return score_column, True
    if rank_column:
        return rank_column, False
    for column in ORDER_COLUMNS:
        if column in table.column_names and column != judge:
            return column, column in (FIRST_STAGE_SCORE, SCORE)
    raise InputError(
        f"the run has no first-stage order: none of {list(ORDER_COLUMNS)} is a column (columns are "
        f"{table.column_names}); add one, or name yours with `--set input.rank_column=...` or `input.score_column`"
    )


@dataclass
class RunColumns:
    """A run's column names without its rows (from Parquet schemas), for the checks made before reading."""

    column_names: list[str]


def check_columns(
    uri: str,
    table,
    score_column: str | None,
    rank_column: str | None,
    judge_score_column: str | None,
) -> tuple[str, bool]:
    """The checks `load_run` makes on the run's columns; returns the first-stage order (column, is_score)."""
    for column in (QUERY_ID, DOC_ID):
        if column not in table.column_names:
            raise InputError(
                f"run {uri!r} has no `{column}` column; columns are {table.column_names}"
            )
    if judge_score_column and judge_score_column not in table.column_names:
        raise InputError(
            f"judge score column `{judge_score_column}` not in the run; columns are {table.column_names}"
        )
    return _order_column(table, score_column, rank_column, judge_score_column)


def _reject_reasons(table: pa.Table, key: pa.ChunkedArray, order: str) -> pa.Array:
    """(N,) string: why a row cannot be evaluated, null for good rows."""
    conditions = pc.make_struct(
        pc.is_null(table[QUERY_ID]),
        pc.is_null(table[DOC_ID]),
        pc.is_nan(pc.fill_null(key, float("nan"))),
        field_names=["q", "d", "k"],
    )
    reasons = [
        pa.scalar(f"null {QUERY_ID}"),
        pa.scalar(f"null {DOC_ID}"),
        pa.scalar(f"null or NaN first-stage {order}"),
    ]
    return pc.case_when(conditions, *reasons)


def load_run(
    uri: str,
    storage_options: dict | None = None,
    score_column: str | None = None,
    rank_column: str | None = None,
    judge_score_column: str | None = None,
    keep_columns: list[str] = (),
) -> RunInput:
    """Read `--run` (see the module docstring). `keep_columns` (segments), query and document are kept if present."""
    if is_parquet(uri, storage_options):
        table = _read_parquet_run(uri, storage_options)
    else:
        table = read_run(uri, storage_options)
    order, is_score = check_columns(uri, table, score_column, rank_column, judge_score_column)
    loaded = prepare_run(table, uri, order, is_score, judge_score_column, keep_columns)
    if loaded.pairs.num_rows == 0:
        raise no_usable_rows(uri, loaded.rejected)
    return loaded


def no_usable_rows(uri: str, rejected: pa.Table) -> InputError:
    return InputError(
        f"run {uri!r}: no usable rows ({rejected.num_rows} rejected, first reason: "
        f"{rejected[REASON][0].as_py() if rejected.num_rows else 'empty input'})"
    )


def prepare_run(
    table: pa.Table,
    uri: str,
    order: str,
    is_score: bool,
    judge_score_column: str | None = None,
    keep_columns: list[str] = (),
) -> RunInput:
    """Rows of a run (all of it, or whole queries of it) -> RunInput: order key, rejected rows, duplicate check,
    trec_eval ranks. `order`/`is_score` from `check_columns`."""
    try:
        key = table[order].cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(
            f"run column `{order}` must be numeric, got {table.schema.field(order).type}"
        ) from None
    key = key if is_score else pc.negate(key)
    reason = _reject_reasons(table, key, order)
    good = pc.is_null(reason)
    rejected = table.filter(pc.invert(good)).append_column(REASON, pc.drop_null(reason))

    columns = {
        QUERY_ID: table[QUERY_ID].cast(pa.string()),
        DOC_ID: table[DOC_ID].cast(pa.string()),
        SCORE: key,
    }
    if judge_score_column:
        columns[JUDGE_SCORE] = table[judge_score_column].cast(pa.float64())
    for column in [*keep_columns, QUERY, DOCUMENT]:
        if column in table.column_names and column not in columns:
            columns[column] = table[column]
    pairs = pa.table(columns).filter(good)
    counts = pairs.group_by([QUERY_ID, DOC_ID]).aggregate([([], "count_all")])
    duplicated = counts.filter(pc.greater(counts["count_all"], 1))
    if duplicated.num_rows:
        raise InputError(
            f"run {uri!r} lists document {duplicated[DOC_ID][0].as_py()!r} for query "
            f"{duplicated[QUERY_ID][0].as_py()!r} more than once ({duplicated.num_rows} duplicated pairs); "
            "each (query_id, doc_id) must appear once"
        )
    return RunInput(
        pairs=rank_by_score(pairs, SCORE, FIRST_STAGE_RANK), rejected=rejected, order_column=order
    )
