"""Plan shards from Parquet metadata (driver) and read one shard into validated long-format rows (worker).

A shard is a run of whole row groups of one input file, numbered in a deterministic order; each of its
rows gets a `_row` key (shard << 32 | row index) that every later stage carries, so rows can be counted,
deduplicated and never confused, whatever batches they travel in.

Output of `ReadShard` (one row per (query, candidate) pair, grouped input exploded):
    query_id, query, doc_id, document, [carried columns...], _shard int32, _row int64, reason string
`reason` is null for rows to score and says why for rows that go to `rejected/`.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.errors import InputError
from pipeline.stages.validate import InputLayout, row_reasons
from pipeline.storage import url_to_fs

SHARD = "_shard"
ROW = "_row"


@dataclass(frozen=True)
class Shard:
    shard: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int      # rows in the file's row groups (queries, for grouped input)
    num_pairs: int     # pairs they expand to (= num_rows for long input; computed at plan time for grouped)

    def to_item(self) -> dict:
        item = asdict(self)
        item["row_groups"] = list(self.row_groups)
        return item

    @classmethod
    def from_item(cls, item: dict) -> "Shard":
        return cls(int(item["shard"]), str(item["path"]), tuple(int(g) for g in item["row_groups"]),
                   int(item["num_rows"]), int(item["num_pairs"]))


def list_input_files(uri: str, storage_options: dict) -> tuple[object, list[str]]:
    fs, path = url_to_fs(uri, storage_options)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))
        if not files:
            raise InputError(f"no .parquet files under {uri!r}")
    elif fs.isfile(path):
        files = [path]
    else:
        matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else []
        if not matches:
            raise InputError(f"input {uri!r} not found; pass a Parquet file, a folder of them or a glob")
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
            pf = pq.ParquetFile(f)
            groups, rows, pairs = [], 0, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if n == 0:
                    continue
                p = n
                if layout.grouped:
                    lists = pf.read_row_group(g, columns=[doc_ids]).column(0)
                    # A query without candidates still yields one (rejected) row.
                    p = int(pc.sum(pc.max_element_wise(pc.fill_null(pc.list_value_length(lists), 0), 1)).as_py())
                if groups and pairs + p > rows_per_shard:
                    shards.append(Shard(len(shards), path, tuple(groups), rows, pairs))
                    groups, rows, pairs = [], 0, 0
                groups.append(g)
                rows += n
                pairs += p
            if groups:
                shards.append(Shard(len(shards), path, tuple(groups), rows, pairs))
    return shards


def query_ids_unique(fs, files: list[str], column: str) -> bool:
    """Grouped input: does every query id stand in one row only? (Reads the id column alone.)"""
    ids = []
    for path in files:
        with fs.open(path, "rb") as f:
            ids.append(pq.read_table(f, columns=[column]).column(0).cast(pa.string()))
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
            table = pq.ParquetFile(f).read_row_groups(list(shard.row_groups), columns=self.layout.read_columns)
        table = self.layout.normalize(table)  # long format, canonical names and types
        if table.num_rows != shard.num_pairs:
            raise InputError(f"{shard.path}: shard {shard.shard} read {table.num_rows} rows, planned {shard.num_pairs}; "
                             "was the input modified while the job ran?")
        rows = pa.array((shard.shard << 32) + i for i in range(table.num_rows)) if table.num_rows else pa.array([], pa.int64())
        table = table.append_column(SHARD, pa.array([shard.shard] * table.num_rows, pa.int32()))
        table = table.append_column(ROW, rows.cast(pa.int64()))
        table = table.append_column(S.REASON, row_reasons(table))
        return table.drop_columns([c for c in table.column_names if c == "_no_candidates"])
