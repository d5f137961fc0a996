"""Per-segment means: any query-level column (language, query type, tenant) splits every measure.

A segment is a property of the query, so a segment column must hold one value per query; the value is
taken from the run's rows. Queries with a null value form the segment "(null)".
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import InputError
from pipeline.core.schema import QUERY_ID

NULL_SEGMENT = "(null)"
NUM_QUERIES = "num_queries"


def query_segments(table: pa.Table, columns: list[str]) -> pa.Table:
    """(query_id, <columns>..., other columns) rows -> (query_id, <columns> as strings), one row per query."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(
            f"segment column(s) {missing} not in the run; columns are {table.column_names}; "
            "a TREC run file has no such columns: pass a Parquet run that carries them, or drop them from "
            "`segment_columns`"
        )
    if not columns:
        return pa.table({QUERY_ID: pc.unique(table[QUERY_ID])})
    per_query = table.select([QUERY_ID, *columns])
    for column in columns:
        per_query = per_query.set_column(
            per_query.schema.get_field_index(column),
            column,
            pc.fill_null(per_query[column].cast(pa.string()), NULL_SEGMENT),
        )
    distinct = per_query.group_by(QUERY_ID).aggregate([(c, "count_distinct") for c in columns])
    for column in columns:
        several = distinct.filter(pc.greater(distinct[f"{column}_count_distinct"], 1))
        if several.num_rows:
            raise InputError(
                f"segment column `{column}` has several values within query {several[QUERY_ID][0].as_py()!r} "
                f"({several.num_rows} such queries); a segment must be a property of the query"
            )
    # "first" is an ordered aggregation, which Arrow only runs single-threaded.
    return (
        per_query.group_by(QUERY_ID, use_threads=False)
        .aggregate([(c, "first") for c in columns])
        .rename_columns([QUERY_ID, *columns])
    )


def segment_means(
    per_query: pa.Table, segments: pa.Table, columns: list[str]
) -> dict[str, dict[str, dict]]:
    """{column: {value: {measure: mean, ..., "num_queries": n}}} for every float column of `per_query`.

    per_query: (query_id, <measure>: float64 ...); segments: (query_id, <columns>: string) from query_segments.
    Queries without a segment row land in "(null)".
    """
    measures = [
        n for n in per_query.column_names if pa.types.is_floating(per_query.schema.field(n).type)
    ]
    joined = per_query.join(
        segments.select([QUERY_ID, *columns]), keys=QUERY_ID, join_type="left outer"
    )
    out: dict[str, dict[str, dict]] = {}
    for column in columns:
        keyed = joined.set_column(
            joined.schema.get_field_index(column),
            column,
            pc.fill_null(joined[column], NULL_SEGMENT),
        )
        grouped = keyed.group_by(column).aggregate(
            [(m, "mean") for m in measures] + [([], "count_all")]
        )
        grouped = grouped.sort_by(column)
        out[column] = {
            row[column]: {**{m: row[f"{m}_mean"] for m in measures}, NUM_QUERIES: row["count_all"]}
            for row in grouped.to_pylist()
        }
    return out
