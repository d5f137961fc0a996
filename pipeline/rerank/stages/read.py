"""Plan shards from Parquet metadata (driver) and read one shard into validated long-format rows (worker).

A shard is a run of whole row groups of one input file, numbered in a deterministic order; each of its
rows gets a `_row` key (shard << 32 | row index) that every later stage carries, so rows can be counted,
deduplicated and never confused, whatever batches they travel in. The row index counts pairs (grouped input
exploded, a query without candidates as one row) in row-group order; `Shard.group_pairs` says how many each
row group holds, so `ReadShard.read_rows` can re-read a few rows by their key from their row group alone.

Output of `ReadShard` (one row per (query, candidate) pair, grouped input exploded):
    query_id, query, doc_id, document, [carried columns...], _shard int32, _row int64, reason string
`reason` is null for rows to score and says why for rows that go to `rejected/`.

Unreadable data (`input.on_unreadable`): a row group whose footer entry is fine but whose pages cannot be
decoded (corrupt compressed data, a broken page header, a failed page checksum; checksums are verified
when the writer stored them). Row groups are read one at a time, so the fault is confined to one:
- `fail` (default): an InputError naming the file and the row group, raised in the read actor (the driver
  re-raises it as one line). For grouped input the candidates' doc ids are read at plan time to count
  pairs, so a fault there stops the job before any work.
- `reject`: the row group's rows go to `rejected/` with reason `unreadable_file`. Their number comes from
  the Parquet metadata (long input: the row group's rows). Each column is re-read on its own and what
  decodes is kept (a corrupt `document` chunk still leaves the ids); the rest is null. Grouped input counts
  pairs at plan time from the candidates' doc_id column; if that column itself cannot be decoded, its
  candidates cannot be counted and each query of the row group counts as one rejected row (doc_id null).
A file whose footer cannot be read is always an error: its rows cannot even be counted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.errors import InputError
from pipeline.core.storage import url_to_fs
from pipeline.rerank.stages.validate import UNREADABLE_FILE, InputLayout, repair_utf8, row_reasons

SHARD, ROW = S.SHARD, S.ROW  # re-exported: stages import them from here


@dataclass(frozen=True)
class Shard:
    shard: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int  # rows in the file's row groups (queries, for grouped input)
    num_pairs: (
        int  # pairs they expand to (= num_rows for long input; computed at plan time for grouped)
    )
    group_pairs: tuple[
        int, ...
    ]  # pairs per row group, in `row_groups` order (they sum to num_pairs)

    def to_item(self) -> dict:
        item = asdict(self)
        item["row_groups"], item["group_pairs"] = list(self.row_groups), list(self.group_pairs)
        return item

    @classmethod
    def from_item(cls, item: dict) -> Shard:
        return cls(
            int(item["shard"]),
            str(item["path"]),
            tuple(int(g) for g in item["row_groups"]),
            int(item["num_rows"]),
            int(item["num_pairs"]),
            tuple(int(p) for p in item["group_pairs"]),
        )


# Errors that mean "these bytes do not decode" (pyarrow raises a plain OSError for corrupt compressed data,
# page headers and checksums), as opposed to the storage failing to deliver them.
_NOT_DATA = (
    FileNotFoundError,
    PermissionError,
    ConnectionError,
    TimeoutError,
    InterruptedError,
    MemoryError,
)


def _undecodable(error: Exception) -> bool:
    # Arrow's own decode failures are plain OSErrors without an errno; a network or disk fault from the
    # filesystem below carries one (or is a subclass: aiohttp's ClientOSError), and must stay a fault of the
    # storage (exit 3, resumable), never become rows rejected as unreadable.
    from pipeline.core.faults import explain

    if isinstance(error, _NOT_DATA) or explain(error) is not None:
        return False
    return isinstance(error, pa.ArrowException) or (type(error) is OSError and error.errno is None)


def _unreadable(layout: InputLayout, path: str, group: int, error: Exception) -> None:
    """A row group's data cannot be decoded: an InputError, unless input.on_unreadable=reject."""
    if layout.config.on_unreadable == "fail":
        detail = " ".join(str(error).split())
        raise InputError(
            f"{path}: row group {group} cannot be decoded ({detail}); replace or remove the file, "
            "or set input.on_unreadable=reject to reject its rows"
        ) from None


def _parquet(f) -> pq.ParquetFile:
    # Checksums are optional in Parquet; where the writer stored them they catch corruption that would
    # otherwise decode into wrong values silently (an uncompressed page).
    return pq.ParquetFile(f, page_checksum_verification=True)


def list_input_files(uri: str, storage_options: dict) -> tuple[object, list[str]]:
    fs, path = url_to_fs(uri, storage_options)
    if fs.isdir(path):
        files = sorted(
            p
            for p in fs.find(path)
            if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
        )
        if not files:
            raise InputError(f"no .parquet files under {uri!r}")
    elif fs.isfile(path):
        files = [path]
    else:
        matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else []
        if not matches:
            raise InputError(
                f"input {uri!r} not found; pass a Parquet file, a folder of them or a glob"
            )
        files = matches
    return fs, files


def read_schemas(fs, files: list[str]) -> list[pa.Schema]:
    """Every input file's Parquet schema (footers only), or an InputError naming the unreadable file."""
    schemas = []
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                schemas.append(pq.read_schema(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"cannot read {path} as Parquet: {str(e).splitlines()[0]}") from None
    return schemas


def plan_shards(fs, files: list[str], layout: InputLayout, rows_per_shard: int) -> list[Shard]:
    """Whole row groups per shard, about `rows_per_shard` pairs each, numbered in file order; empty row
    groups are skipped. For grouped input only the candidates' doc ids are read, to count pairs."""
    shards: list[Shard] = []
    doc_ids = f"{layout.candidates}.list.element.{layout.config.doc_id_column}"
    for path in files:
        with fs.open(path, "rb") as f:
            pf = _parquet(f)
            groups, counts = [], []
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if n == 0:
                    continue
                p = n
                if layout.grouped:
                    try:
                        lists = pf.read_row_group(g, columns=[doc_ids]).column(0)
                    except Exception as e:
                        if not _undecodable(e):
                            raise
                        _unreadable(layout, path, g, e)
                        lists = (
                            None  # rejected: one row per query, its candidates cannot be counted
                        )
                    if lists is not None:
                        # A query without candidates still yields one (rejected) row.
                        p = int(
                            pc.sum(
                                pc.max_element_wise(pc.fill_null(pc.list_value_length(lists), 0), 1)
                            ).as_py()
                        )
                if groups and sum(counts) + p > rows_per_shard:
                    shards.append(_shard(len(shards), path, groups, counts, pf))
                    groups, counts = [], []
                groups.append(g)
                counts.append(p)
            if groups:
                shards.append(_shard(len(shards), path, groups, counts, pf))
    return shards


def _shard(
    number: int, path: str, groups: list[int], counts: list[int], pf: pq.ParquetFile
) -> Shard:
    rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
    return Shard(number, path, tuple(groups), rows, sum(counts), tuple(counts))


def query_ids_unique(fs, files: list[str], column: str) -> bool:
    """Grouped input: does every query id stand in one row only? (Reads the id column alone.)

    Row groups whose ids cannot be decoded are left out: their rows are rejected (input.on_unreadable=reject)
    or stop the job in the read stage, so they never reach ranking."""
    ids = []
    for path in files:
        with fs.open(path, "rb") as f:
            pf = _parquet(f)
            for g in range(pf.metadata.num_row_groups):
                try:
                    ids.append(pf.read_row_group(g, columns=[column]).column(0).cast(pa.string()))
                except Exception as e:
                    if not _undecodable(e):
                        raise
    column_ids = pa.chunked_array([c for t in ids for c in t.chunks], type=pa.string())
    return pc.count_distinct(column_ids, mode="all").as_py() == len(column_ids)


class ReadShard:
    """Reads shards (one descriptor per input row) into validated long-format pair rows."""

    def __init__(self, layout: InputLayout, storage_options: dict, uri: str):
        self.layout = layout
        self.fs, _ = url_to_fs(uri, storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [self.read(Shard.from_item(item)) for item in batch.to_pylist()]
        return pa.concat_tables(tables) if tables else self.layout.empty_rows()

    def read(self, shard: Shard) -> pa.Table:
        with self.fs.open(shard.path, "rb") as f:
            pf = _parquet(f)
            parts = [
                self._read_group(pf, shard, g, p)
                for g, p in zip(shard.row_groups, shard.group_pairs)
            ]
        table = (
            pa.concat_tables(parts)
            if parts
            else self.layout.empty_rows().drop_columns([SHARD, ROW])
        )
        rows = (shard.shard << 32) + np.arange(table.num_rows, dtype=np.int64)
        table = table.add_column(
            table.num_columns - 1, SHARD, pa.array(np.full(table.num_rows, shard.shard, np.int32))
        )
        return table.add_column(table.num_columns - 1, ROW, pa.array(rows))

    def read_rows(self, shard: Shard, index: np.ndarray) -> Iterator[pa.Table]:
        """The pair rows at sorted positions `index` of the shard (`_row & 0xFFFFFFFF`), as `read` gives them
        less `_shard` and `_row`, in order, one table per row group: only the row groups holding them are read."""
        starts = np.concatenate([[0], np.cumsum(shard.group_pairs)])
        where = np.searchsorted(starts, index, side="right") - 1
        with self.fs.open(shard.path, "rb") as f:
            pf = _parquet(f)
            for k in np.unique(where):
                table = self._read_group(pf, shard, shard.row_groups[k], shard.group_pairs[k])
                yield table.take(pa.array(index[where == k] - starts[k]))

    def _read_group(self, pf: pq.ParquetFile, shard: Shard, group: int, pairs: int) -> pa.Table:
        """One row group -> pair rows with their `reason` (pair schema + reason)."""
        try:
            raw = pf.read_row_group(group, columns=self.layout.read_columns)
        except Exception as e:
            if not _undecodable(e):
                raise
            _unreadable(self.layout, shard.path, group, e)
            raw = None
        table = self.layout.normalize(raw if raw is not None else self._salvage(pf, group))
        if table.num_rows != pairs:
            raise InputError(
                f"{shard.path}: row group {group} read as {table.num_rows} rows, planned {pairs}; "
                "was the input modified while the job ran?"
            )
        table, bad_utf8 = repair_utf8(table)
        if raw is None:
            reason = pa.array([UNREADABLE_FILE] * table.num_rows, pa.string())
        else:
            reason = row_reasons(table, bad_utf8)
        table = table.drop_columns([c for c in table.column_names if c == S.NO_CANDIDATES_FLAG])
        return table.append_column(S.REASON, reason)

    def _salvage(self, pf: pq.ParquetFile, group: int) -> pa.Table:
        """An undecodable row group's columns, each read on its own: what decodes, and nulls for the rest."""
        n = pf.metadata.row_group(group).num_rows
        columns = {}
        for name in self.layout.read_columns:
            if self.layout.grouped and name == self.layout.candidates:
                columns[name] = self._salvage_candidates(pf, group, n)
            else:
                read = _try_read(pf, group, name)
                columns[name] = (
                    read if read is not None else pa.nulls(n, pf.schema_arrow.field(name).type)
                )
        return pa.table(columns)

    def _salvage_candidates(self, pf: pq.ParquetFile, group: int, n: int) -> pa.Array:
        """The candidates' lists as planning counted them (from the doc_id leaf), with every struct field that
        decodes on its own into the same lists, nulls for the rest; all null if the doc_id leaf fails too."""
        name, doc_id = self.layout.candidates, self.layout.config.doc_id_column
        list_type = pf.schema_arrow.field(name).type
        whole = _try_read(pf, group, name)
        if whole is not None:
            return whole
        ids = _try_read(pf, group, f"{name}.list.element.{doc_id}")
        if ids is None:
            return pa.nulls(n, list_type)
        fields = []
        for f in list_type.value_type:
            leaf = (
                ids if f.name == doc_id else _try_read(pf, group, f"{name}.list.element.{f.name}")
            )
            same = (
                leaf is not None
                and leaf.offsets.equals(ids.offsets)
                and leaf.is_null().equals(ids.is_null())
                and leaf.values.is_null().equals(ids.values.is_null())
            )
            fields.append(leaf.values.field(0) if same else pa.nulls(len(ids.values), f.type))
        values = pa.StructArray.from_arrays(
            fields, fields=list(list_type.value_type), mask=ids.values.is_null()
        )
        lists = pa.LargeListArray if pa.types.is_large_list(list_type) else pa.ListArray
        return lists.from_arrays(ids.offsets, values, mask=ids.is_null())


def _try_read(pf: pq.ParquetFile, group: int, column: str) -> pa.Array | None:
    """A row group's column (or nested leaf, by its dotted path) as one array; None where it does not decode."""
    try:
        return pf.read_row_group(group, columns=[column]).column(0).combine_chunks()
    except Exception as e:
        if not _undecodable(e):
            raise
        return None
