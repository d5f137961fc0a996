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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.storage import join, url_to_fs

HISTORY_FILE = "history.parquet"
PER_QUERY_DIR = "per_query"
NIGHT = "night"


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

    def read(self) -> pa.Table | None:
        """The history table sorted by night, or None before the first night."""
        if not self.fs.exists(self.table_path):
            return None
        try:
            table = pq.read_table(self.table_path, filesystem=self.fs)
        except pa.ArrowInvalid as e:
            raise InputError(f"history {self.uri!r}: {HISTORY_FILE} is not a readable Parquet file: {e}") from None
        if NIGHT not in table.column_names:
            raise InputError(f"history {self.uri!r}: {HISTORY_FILE} has no `{NIGHT}` column; is this a history folder?")
        return table.sort_by(NIGHT)

    def nights(self) -> list[str]:
        table = self.read()
        return [] if table is None else table[NIGHT].to_pylist()

    def previous_night(self, night: str) -> str | None:
        """The latest night strictly before `night` that has a row, or None."""
        earlier = [n for n in self.nights() if n < night]
        return earlier[-1] if earlier else None

    def read_per_query(self, night: str) -> pa.Table | None:
        path = self._per_query_path(night)
        if not self.fs.exists(path):
            return None
        return pq.read_table(path, filesystem=self.fs)

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
