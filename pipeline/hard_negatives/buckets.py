"""Selection per ranking bucket in Ray tasks, then output parts merged by query: the two stages of the job's
distributed path, plain classes (no Ray import; `job.py` runs them as Ray tasks).

    ranked/part-BBBBB.parquet --SelectBucket--> <work>/{kind}/part-PPPPP/bucket-BBBBB.parquet + a stats piece
    <work>/{kind}/part-PPPPP/*  --WritePart-->   candidates/, triplet/, n-tuple/ part-PPPPP.parquet,
                                                 flagembedding/train[-PPPPP].jsonl

A ranked part holds whole queries (the rerank job buckets by hash(query_id)), so selection, which works per
query, runs on one part without seeing any other. Output parts are not the rerank's buckets: a query goes to
output part hash(query_id) % num_parts, num_parts coming from the number of scored rows alone, and each part
is sorted by query (the canonical order: query_id, score descending, doc_id). So the files are the same bytes
whatever the number of buckets (output.rows_per_bucket) or tasks.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.ranking import job_order
from pipeline.core.storage import atomic_write, join, url_to_fs
from pipeline.hard_negatives import projections as proj
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.io import CANDIDATES, with_run_metadata
from pipeline.hard_negatives.select import CANONICAL_SCHEMA, select_negatives
from pipeline.hard_negatives.stats import stats_piece
from pipeline.rerank.stages.write import bucket_of

KEY = "_query_id"  # the query of a training row, kept in the fragments so a part can be sorted by query
FLAGEMBEDDING_LINE = "line"
KINDS = (CANDIDATES, "triplet", "n-tuple", "flagembedding")


def part_name(kind: str, part: int, num_parts: int) -> str:
    if kind == "flagembedding":
        return "train.jsonl" if num_parts == 1 else f"train-{part:05d}.jsonl"
    return f"part-{part:05d}.parquet"


def _ranked(table: pa.Table) -> pa.Table:
    """ids as strings, score as float32: how selection and the training files compare them."""
    for name, dtype in (
        (schema.QUERY_ID, pa.string()),
        (schema.DOC_ID, pa.string()),
        (schema.SCORE, pa.float32()),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(dtype))
    return table


def _training_rows(
    examples: list[proj.QueryExamples], config: HardNegativesConfig
) -> dict[str, pa.Table]:
    """The configured training tables of these queries, each row with its query id (KEY)."""
    per = config.selection.negatives_per
    n = config.selection.num_negatives
    ids = [e.query_id for e in examples]
    out = {}
    for name in config.projections.formats:
        if name == "triplet":
            table = proj.triplets(examples, config.selection, config.projections)
            counts = [sum(len(negs) for _, negs in e.pairs(per)) for e in examples]
        elif name == "n-tuple":
            table = proj.n_tuples(examples, config.selection, config.projections)
            counts = [sum(len(negs) >= n for _, negs in e.pairs(per)) for e in examples]
        else:
            records = proj.flagembedding_records(examples)
            table = pa.table(
                {
                    FLAGEMBEDDING_LINE: pa.array(
                        [json.dumps(r, ensure_ascii=False) for r in records], pa.string()
                    )
                }
            )
            counts = [1 if e.negatives else 0 for e in examples]
        out[name] = table.append_column(
            KEY, pa.array(np.repeat(np.array(ids, dtype=object), counts).tolist(), pa.string())
        )
    return out


class SelectBucket:
    """Select the negatives of one ranked part's queries; write its rows as fragments of the output parts."""

    def __init__(
        self, config: HardNegativesConfig, qrels: pa.Table | None, work_uri: str, num_parts: int
    ):
        self.config = config
        self.qrels = qrels
        self.fs, self.work = url_to_fs(work_uri, config.storage_options)
        self.num_parts = num_parts

    def select(self, ranked: pa.Table) -> tuple[pa.Table, dict[str, pa.Table], dict]:
        """(canonical rows, training tables with KEY, stats piece) of a table of whole queries."""
        ranked = _ranked(ranked)
        qrels = self.qrels
        if qrels is not None:  # the positives of this bucket's queries
            qrels = qrels.filter(
                pc.is_in(
                    qrels[schema.QUERY_ID].cast(pa.string()),
                    value_set=pc.unique(ranked[schema.QUERY_ID]),
                )
            )
        canonical = select_negatives(ranked, self.config.selection, qrels)
        examples = list(proj.query_examples(canonical, ranked))
        piece = stats_piece(canonical, self.config.selection, qrels)
        piece["projections"] = projection_counts(examples, self.config)
        return canonical, _training_rows(examples, self.config), piece

    def __call__(self, batch: pa.Table) -> pa.Table:
        pieces = []
        for item in batch.to_pylist():
            fs, path = url_to_fs(item["uri"], self.config.storage_options)
            with fs.open(path, "rb") as f:
                ranked = pq.read_table(f)
            canonical, training, piece = self.select(ranked)
            tables = {
                CANDIDATES: canonical.append_column(KEY, canonical[schema.QUERY_ID]),
                **training,
            }
            for kind, table in tables.items():
                parts = (
                    bucket_of(table[KEY].combine_chunks(), self.num_parts)
                    if table.num_rows
                    else np.zeros(0)
                )
                for part in np.unique(parts):
                    folder = join(self.work, kind, f"part-{int(part):05d}")
                    self.fs.makedirs(folder, exist_ok=True)
                    rows = table.filter(pa.array(parts == part))
                    # Named by bucket: a retried task rewrites its own fragment, never adds one.
                    atomic_write(
                        self.fs,
                        join(folder, f"bucket-{item['bucket']:05d}.parquet"),
                        lambda f, t=rows: pq.write_table(t, f),
                    )
            pieces.append(json.dumps(piece))
        return pa.table({"piece": pa.array(pieces, pa.string())})


def projection_counts(examples: list[proj.QueryExamples], config: HardNegativesConfig) -> dict:
    per, n = config.selection.negatives_per, config.selection.num_negatives
    counts = {}
    for name in config.projections.formats:
        if name == "triplet":
            counts["triplet_rows"] = sum(len(negs) for e in examples for _, negs in e.pairs(per))
        elif name == "n-tuple":
            counts["n_tuple_rows"] = sum(
                len(negs) >= n for e in examples for _, negs in e.pairs(per)
            )
            counts["n_tuple_rows_left_out_short"] = proj.tuple_rows_short(
                examples, config.selection
            )
        elif name == "flagembedding":
            counts["flagembedding_lines"] = sum(1 for e in examples if e.negatives)
    return counts


class WritePart:
    """Merge one output part's fragments from every bucket, in query order, into its final files."""

    def __init__(
        self, config: HardNegativesConfig, work_uri: str, output_uri: str, num_parts: int, run: dict
    ):
        self.config = config
        self.fs, self.work = url_to_fs(work_uri, config.storage_options)
        _, self.root = url_to_fs(output_uri, config.storage_options)
        self.num_parts = num_parts
        self.run = run

    def _fragments(self, kind: str, part: int) -> pa.Table | None:
        paths = sorted(self.fs.glob(join(self.work, kind, f"part-{part:05d}", "bucket-*.parquet")))
        tables = []
        for path in paths:
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables).combine_chunks() if tables else None

    def _empty(self, kind: str) -> pa.Table:
        if kind == CANDIDATES:
            return CANONICAL_SCHEMA.empty_table()
        if kind == "flagembedding":
            return pa.table({FLAGEMBEDDING_LINE: pa.array([], pa.string())})
        make = proj.triplets if kind == "triplet" else proj.n_tuples
        return make([], self.config.selection, self.config.projections)

    def __call__(self, batch: pa.Table) -> pa.Table:
        for part in batch["part"].to_pylist():
            for kind in (CANDIDATES, *self.config.projections.formats):
                table = self._fragments(kind, part)
                if table is None:
                    table = self._empty(kind)
                elif kind == CANDIDATES:
                    table = table.drop_columns([KEY]).sort_by(job_order())
                else:  # a query's rows come from one fragment, in order: a stable sort by query keeps them so
                    table = table.take(pc.sort_indices(table[KEY])).drop_columns([KEY])
                table = table.combine_chunks()
                folder = join(self.root, kind)
                self.fs.makedirs(folder, exist_ok=True)
                path = join(folder, part_name(kind, part, self.num_parts))
                if kind == "flagembedding":
                    lines = "".join(line + "\n" for line in table[FLAGEMBEDDING_LINE].to_pylist())
                    atomic_write(self.fs, path, lambda f, text=lines: f.write(text.encode("utf-8")))
                else:
                    stamped = with_run_metadata(table, self.run)
                    atomic_write(self.fs, path, lambda f, t=stamped: pq.write_table(t, f))
        return pa.table({"part": batch["part"]})
