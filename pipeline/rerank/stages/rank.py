"""Rank one bucket: every row of the queries hashed to it, read back from the staging files.

In order: drop exact repeats of a (row, window) (a retried task may have written a batch twice), keep
each row's best window (jina's max over windows), reject repeated (query_id, doc_id) pairs (the first
in input order is kept), rank within each query by score descending with ties broken by doc_id
ascending, keep the best `top_k`, and write `ranked/part-BBBBB.parquet` (plus the duplicates to
`rejected/`). Files are written to a temporary name and moved, so a reader never sees half a file.

Duplicates keep their input columns, like every rejected row, although texts never travel this far (only
ids and scores are staged): their `_row` key names the shard and the row within it, so the ranker re-reads
exactly those rows from their row groups of the input (`ReadShard.read_rows`) and checks that their ids
still match. Duplicates are rare, so this costs a few row-group reads per bucket, written as they arrive.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.errors import InputError, PipelineError
from pipeline.core.groups import group_positions
from pipeline.core.ranking import job_order
from pipeline.core.storage import atomic_write, join, map_paths, url_to_fs
from pipeline.rerank.stages.read import ROW, SHARD, ReadShard, Shard
from pipeline.rerank.stages.validate import InputLayout

DUPLICATE = "duplicate (query_id, doc_id)"


def rank_rows(table: pa.Table, top_k: int | None) -> tuple[pa.Table, pa.Table, int]:
    """(ranked rows, duplicate rows, number of distinct scored pairs before top_k) from a bucket's rows."""
    table = table.sort_by([(ROW, "ascending"), (S.WINDOW, "ascending")])
    table = table.filter(pa.array(group_positions(table.column(ROW), table.column(S.WINDOW)).first))
    best = table.group_by(ROW).aggregate([(S.SCORE, "max")]).rename_columns([ROW, S.BEST])
    table = (
        table.filter(pc.equal(table.column(S.WINDOW), 0))
        .join(best, ROW)
        .sort_by([(ROW, "ascending")])
    )
    table = table.set_column(
        table.schema.get_field_index(S.SCORE), S.SCORE, table.column(S.BEST).cast(pa.float32())
    )
    by_pair = table.sort_by(
        [(S.QUERY_ID, "ascending"), (S.DOC_ID, "ascending"), (ROW, "ascending")]
    )
    first = group_positions(by_pair.column(S.QUERY_ID), by_pair.column(S.DOC_ID)).first
    duplicates, table = by_pair.filter(pa.array(~first)), by_pair.filter(pa.array(first))
    table = table.sort_by(job_order())
    rank = group_positions(table.column(S.QUERY_ID)).position.astype(np.int32)
    table = table.append_column(S.RANK, pa.array(rank))
    scored = table.num_rows
    if top_k is not None:
        table = table.filter(pa.array(rank <= top_k))
    internal = [ROW, SHARD, S.WINDOW, S.NUM_TOKENS, S.NUM_WINDOWS, S.BEST]
    table = table.drop_columns([c for c in internal if c in table.column_names])
    front = [S.QUERY_ID, S.DOC_ID, S.SCORE, S.RANK]
    table = table.select(front + [c for c in table.column_names if c not in front])
    return table, duplicates, scored


class RankBucket:
    def __init__(
        self,
        output_uri: str,
        storage_options: dict,
        top_k: int | None,
        rejected_schema: pa.Schema,
        shards: list[dict],
        layout: InputLayout,
        input_uri: str,
        file_metadata: dict | None = None,
        fill_files: list[str] | None = None,
    ):
        """`file_metadata`: Parquet key-value metadata written on every ranked file (what produced it);
        `fill_files`: the score cache's scores for pairs that waited for a twin of the same texts."""
        self.fill_files = fill_files or []
        self.fs, self.root = url_to_fs(output_uri, storage_options)
        self.file_metadata = file_metadata or {}
        self.top_k = top_k
        self.rejected_schema = rejected_schema
        self.shards = {
            int(item["shard"]): Shard.from_item(item) for item in shards
        }  # the whole plan, by number
        self.reader = ReadShard(layout, storage_options, input_uri)

    def _write_atomic(self, table: pa.Table, path: str) -> None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **self.file_metadata}
        )
        atomic_write(self.fs, path, lambda f: pq.write_table(table, f))

    def _read(self, path: str) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f)

    def _write_duplicates(self, duplicates: pa.Table, path: str) -> None:
        """The duplicates' input rows, re-read from the input by their `_row` keys, as rejected rows."""
        duplicates = duplicates.sort_by([(ROW, "ascending")])
        keys = duplicates.column(ROW).to_numpy()
        shard_of, index = keys >> 32, keys & 0xFFFFFFFF
        names = [f.name for f in self.rejected_schema]
        reason = self.rejected_schema.get_field_index(S.REASON)
        tmp, done = path + ".tmp", 0
        with self.fs.open(tmp, "wb") as f, pq.ParquetWriter(f, self.rejected_schema) as writer:
            for number in np.unique(shard_of):
                shard = self.shards[int(number)]
                for rows in self.reader.read_rows(shard, index[shard_of == number]):
                    staged = duplicates.slice(done, rows.num_rows)
                    for key in (S.QUERY_ID, S.DOC_ID):
                        if not rows.column(key).equals(staged.column(key)):
                            raise InputError(
                                f"{shard.path} changed while the job ran (its rows no longer hold the "
                                "ids that were scored); rerun with a new --output"
                            )
                    done += rows.num_rows
                    rows = rows.select(names).cast(self.rejected_schema)
                    writer.write_table(
                        rows.set_column(
                            reason, S.REASON, pa.array([DUPLICATE] * rows.num_rows, pa.string())
                        )
                    )
        self.fs.mv(tmp, path)

    def _fill(self, rows: pa.Table, bucket: int) -> pa.Table:
        """Scores of the pairs that waited for a twin of the same texts (null until now), from the fill files."""
        if not rows.column(S.SCORE).null_count:
            return rows
        from pipeline.rerank.stages.lookup import read_fills

        fills = read_fills(self.fs, self.fill_files, bucket)
        # index_in rather than a join: carried columns may be nested, which Arrow's hash join cannot carry.
        filled = fills.column(S.SCORE).take(pc.index_in(rows.column(ROW), fills.column(ROW)))
        score = pc.coalesce(rows.column(S.SCORE), filled)
        if score.null_count:
            raise PipelineError(
                f"{score.null_count} pair(s) of ranking bucket {bucket} have no score; delete the "
                "output's _work folder and rerun"
            )
        return rows.set_column(rows.schema.get_field_index(S.SCORE), S.SCORE, score)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for item in batch.to_pylist():
            # A bucket's staging files, read 16 at a time: on object storage each is a round trip.
            rows = pa.concat_tables(
                map_paths(self._read, item["files"], max_workers=16), promote_options="default"
            )
            rows = self._fill(rows, int(item["bucket"]))
            ranked, duplicates, scored = rank_rows(rows, self.top_k)
            self.fs.makedirs(join(self.root, "ranked"), exist_ok=True)
            self._write_atomic(
                ranked, join(self.root, "ranked", f"part-{item['bucket']:05d}.parquet")
            )
            if duplicates.num_rows:
                self.fs.makedirs(join(self.root, "rejected"), exist_ok=True)
                path = join(self.root, "rejected", f"duplicates-{item['bucket']:05d}.parquet")
                self._write_duplicates(duplicates, path)
            reports.append(
                {
                    "bucket": item["bucket"],
                    "scored": scored,
                    "written": ranked.num_rows,
                    "duplicates": duplicates.num_rows,
                }
            )
        return pa.Table.from_pylist(
            reports,
            schema=pa.schema(
                [
                    ("bucket", pa.int64()),
                    ("scored", pa.int64()),
                    ("written", pa.int64()),
                    ("duplicates", pa.int64()),
                ]
            ),
        )
