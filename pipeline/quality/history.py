"""The nightly history: one row per night in a Parquet table, plus each night's per-query values.

Layout under the history URI (a folder, local or any fsspec URI such as s3://bucket/quality/my-index):
    history.parquet             one row per night: night (YYYY-MM-DD), written_at (UTC), run, num_queries,
                                config_hash, <measure>: float64 ... (the means of metrics.json "overall" etc.)
    per_query/<night>.parquet   that night's per-query table (query_id, <measure> ..., segment columns),
                                kept for the paired test and the per-segment comparison of the next night.

Appending is idempotent per night: rerunning a night replaces its row and its per-query file, never adds a
second row. Files are written to a temporary name and then moved into place, so a reader sees the old or
the new table, never half of one. The per-query file is written first, so a history row always has one.
One writer at a time (the nightly job); two concurrent writers could lose one of the two nights' rows.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import InputError
from pipeline.core.storage import join, url_to_fs

HISTORY_FILE = "history.parquet"
PER_QUERY_DIR = "per_query"
NIGHT = "night"
QUERY_ID = "query_id"

# history.parquet's schema: these columns with these kinds of type (written_at and the counts may be absent in
# a history an older version wrote); every other column is a measure's nightly mean, a number.
HISTORY_COLUMNS = {
    NIGHT: ("text", True),
    "run": ("text", False),
    "config_hash": ("text", False),
    "num_queries": ("integer", False),
    "written_at": ("timestamp", False),
}
_KINDS = {
    "text": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "integer": pa.types.is_integer,
    "timestamp": pa.types.is_timestamp,
    "number": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t),
}
NIGHT_FORMAT = re.compile(r"\d{4}-\d\d-\d\d")


def check_history_table(table: pa.Table) -> str | None:
    """What is wrong with a history table's schema or nights, or None."""
    for column, (kind, required) in HISTORY_COLUMNS.items():
        if column not in table.column_names:
            if required:
                return f"it has no `{column}` column"
        elif not _KINDS[kind](table.schema.field(column).type) and not pa.types.is_null(
            table.schema.field(column).type
        ):
            return f"column `{column}` has type {table.schema.field(column).type}, not {kind}"
    for field in table.schema:
        if field.name not in HISTORY_COLUMNS and not _KINDS["number"](field.type):
            return f"measure column `{field.name}` has type {field.type}, not a number"
    nights = table[NIGHT].to_pylist()
    bad = [n for n in nights if n is None or not NIGHT_FORMAT.fullmatch(n)]
    if bad:
        return f"night {bad[0]!r} is not a date YYYY-MM-DD"
    if len(set(nights)) != len(nights):
        return f"night {next(n for n in nights if nights.count(n) > 1)} has more than one row"
    return None


def check_per_query_table(table: pa.Table, measures: list[str]) -> str | None:
    """What is wrong with a night's per-query table, or None. measures: the history's measure columns."""
    if QUERY_ID not in table.column_names:
        return f"it has no `{QUERY_ID}` column"
    if table[QUERY_ID].null_count:
        return f"{table[QUERY_ID].null_count} row(s) have no {QUERY_ID}"
    for name in measures:
        if name in table.column_names and not _KINDS["number"](table.schema.field(name).type):
            return f"measure column `{name}` has type {table.schema.field(name).type}, not a number"
    return None


class History:
    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.fs, self.root = url_to_fs(uri, storage_options)

    @property
    def table_path(self) -> str:
        return join(self.root, HISTORY_FILE)

    def _per_query_path(self, night: str) -> str:
        return join(self.root, PER_QUERY_DIR, f"{night}.parquet")

    def _bad(self, name: str, what: str, fix: str) -> InputError:
        return InputError(f"history {self.uri!r}: {name} {what}; {fix}")

    def read(self) -> pa.Table | None:
        """The history table sorted by night, or None before the first night. A table that does not read or
        does not hold a history's columns is one InputError naming the file."""
        if not self.fs.exists(self.table_path):
            return None
        fix = (
            f"pass this index's history folder, restore its {HISTORY_FILE} from a backup, or pass an empty "
            "folder to start a new history"
        )
        try:
            table = pq.read_table(self.table_path, filesystem=self.fs)
        except (pa.ArrowException, OSError) as e:
            raise self._bad(
                HISTORY_FILE,
                f"is not a readable Parquet file ({str(e).splitlines()[0][:200]})",
                fix,
            ) from None
        problem = check_history_table(table)
        if problem:
            raise self._bad(HISTORY_FILE, f"is not a history table: {problem}", fix)
        return table.sort_by(NIGHT)

    def nights(self) -> list[str]:
        table = self.read()
        return [] if table is None else table[NIGHT].to_pylist()

    def previous_night(self, night: str) -> str | None:
        """The latest night strictly before `night` that has a row, or None."""
        earlier = [n for n in self.nights() if n < night]
        return earlier[-1] if earlier else None

    def read_per_query(self, night: str) -> pa.Table | None:
        """That night's per-query values, None when it has none. A file that does not read or lacks query ids
        is one InputError naming it: deleting it only loses the comparison with that night."""
        path = self._per_query_path(night)
        if not self.fs.exists(path):
            return None
        name = f"{PER_QUERY_DIR}/{night}.parquet"
        fix = (
            f"delete {name} (tonight is then not compared with night {night}; its row in {HISTORY_FILE} stays) "
            "or restore it from a backup"
        )
        try:
            table = pq.read_table(path, filesystem=self.fs)
        except (pa.ArrowException, OSError) as e:
            raise self._bad(
                name, f"is not a readable Parquet file ({str(e).splitlines()[0][:200]})", fix
            ) from None
        history = self.read()
        measures = (
            [] if history is None else [c for c in history.column_names if c not in HISTORY_COLUMNS]
        )
        problem = check_per_query_table(table, measures)
        if problem:
            raise self._bad(name, f"is not a night's per-query table: {problem}", fix)
        return table

    def _write(self, table: pa.Table, path: str) -> None:
        tmp = path + ".tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.mv(tmp, path)

    def with_row(self, row: dict) -> pa.Table:
        """The history as it will be once `row` is appended (nothing written): same night replaced, sorted.

        New measures add columns (null for earlier nights).
        """
        table = pa.Table.from_pylist([row])
        existing = self.read()
        if existing is not None:
            kept = existing.filter(pc.not_equal(existing[NIGHT], row[NIGHT]))
            table = pa.concat_tables([kept, table], promote_options="permissive")
        return table.sort_by(NIGHT)

    def append(self, row: dict, per_query: pa.Table) -> pa.Table:
        """Record one night (row["night"] = "YYYY-MM-DD"), replacing an earlier record of the same night."""
        self._write(per_query, self._per_query_path(row[NIGHT]))
        table = self.with_row(row)
        self._write(table, self.table_path)
        return table
