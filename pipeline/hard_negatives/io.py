"""Reading the job's candidates and writing its outputs (any fsspec URI: local paths, s3://...).

Output layout under --output (stats.json is written last: its presence means the run finished):
    candidates/part-00000.parquet      the canonical table (pipeline.hard_negatives.select), with the run's
                                       parameters, seed, model and revision in the Parquet metadata key
                                       `hard_negatives` (JSON)
    triplet/part-00000.parquet         sentence-transformers projections (pipeline.hard_negatives.projections)
    n-tuple/part-00000.parquet
    flagembedding/train.jsonl
    stats.json                         pipeline.hard_negatives.stats, plus `run` and `projections`

Every file is a pure function of the data, the config and the model, with no clock or host in it, so two runs
with the same inputs and seed write byte-identical files.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.errors import InputError
from pipeline.hard_negatives import projections as proj
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.stats import compute_stats
from pipeline.storage import join, url_to_fs, write_json

METADATA_KEY = b"hard_negatives"
CANDIDATES = "candidates"
STATS = "stats.json"
PART = "part-00000.parquet"


def read_candidates(uri: str, storage_options: dict | None = None) -> pa.Table:
    """Long-format Parquet (a file or a dataset folder) -> the selection's input columns.

    The first stage's `rank` and `score` are renamed `first_stage_rank` and `first_stage_score` (unless those
    exist already), so they cannot be mistaken for the reranker's score.
    """
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise InputError(f"input {uri!r} not found")
    table = pq.read_table(path, filesystem=fs)
    renames = {schema.RANK: schema.FIRST_STAGE_RANK, schema.SCORE: schema.FIRST_STAGE_SCORE}
    names = [renames[n] if n in renames and renames[n] not in table.column_names else n for n in table.column_names]
    table = table.rename_columns(names)
    required = [schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InputError(f"input {uri!r} lacks column(s) {missing}; columns are {table.column_names}; "
                         f"hard-negative mining needs {required} and the first stage's rank")
    return table


def read_ranked(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The rerank job's `ranked/` Parquet (query_id, doc_id, score, rank, carried columns) -> its id and score."""
    fs, path = url_to_fs(uri, storage_options)
    table = pq.read_table(path, filesystem=fs, columns=[schema.QUERY_ID, schema.DOC_ID, schema.SCORE])
    return table.cast(pa.schema([(schema.QUERY_ID, pa.string()), (schema.DOC_ID, pa.string()),
                                 (schema.SCORE, pa.float32())]))


def attach_scores(candidates: pa.Table, ranked: pa.Table) -> tuple[pa.Table, int]:
    """The input's rows (texts, first-stage columns) with the reranker's `score`, joined by (query_id, doc_id).

    Returns (scored, unscored): input pairs the rerank did not score (its rejected/ table says why) are left
    out of `scored` and counted in `unscored`, so the stats can report them.
    """
    ids = {schema.QUERY_ID: pa.string(), schema.DOC_ID: pa.string()}
    left = candidates.drop_columns([c for c in (schema.SCORE, schema.RANK) if c in candidates.column_names])
    for name, dtype in ids.items():
        left = left.set_column(left.schema.get_field_index(name), name, left[name].cast(dtype))
    right = ranked.select([schema.QUERY_ID, schema.DOC_ID, schema.SCORE])
    scored = left.join(right, keys=list(ids), join_type="inner")
    return scored, candidates.num_rows - scored.num_rows


def with_run_metadata(table: pa.Table, run: dict) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(run, sort_keys=True).encode()})


def read_run_metadata(parquet_schema: pa.Schema) -> dict:
    return json.loads(parquet_schema.metadata[METADATA_KEY])


def write_outputs(output: str, canonical: pa.Table, texts: pa.Table, config: HardNegativesConfig,
                  run: dict, qrels: pa.Table | None = None, unscored: int | None = None) -> dict:
    """Write the canonical table, the configured projections and stats.json (last); return the stats.

    run: what produced the data (model, revision, dtype, seed, config, config_hash), stored in the Parquet
    metadata and in stats.json. unscored: input pairs the rerank did not score (stats `unscored_pairs`).
    """
    fs, root = url_to_fs(output, config.storage_options)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(join(root, STATS)):
        fs.rm(join(root, STATS))  # a stale marker must not vouch for half-written files
    _write_parquet(fs, join(root, CANDIDATES), with_run_metadata(canonical, run))

    stats = compute_stats(canonical, config.selection, qrels)
    examples = list(proj.query_examples(canonical, texts))
    counts = {}
    for name in config.projections.formats:
        if name == "triplet":
            table = proj.triplets(examples, config.selection, config.projections)
            _write_parquet(fs, join(root, name), with_run_metadata(table, run))
            counts["triplet_rows"] = table.num_rows
        elif name == "n-tuple":
            table = proj.n_tuples(examples, config.selection, config.projections)
            _write_parquet(fs, join(root, name), with_run_metadata(table, run))
            counts["n_tuple_rows"] = table.num_rows
            counts["n_tuple_rows_left_out_short"] = proj.tuple_rows_short(examples, config.selection)
        elif name == "flagembedding":
            records = proj.flagembedding_records(examples)
            fs.makedirs(join(root, name), exist_ok=True)
            with fs.open(join(root, name, "train.jsonl"), "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["flagembedding_lines"] = len(records)
    stats["projections"] = counts
    if unscored is not None:
        stats["unscored_pairs"] = unscored
    stats["run"] = run
    write_json(fs, join(root, STATS), stats)
    return stats


def _write_parquet(fs, folder: str, table: pa.Table) -> None:
    fs.makedirs(folder, exist_ok=True)
    with fs.open(join(folder, PART), "wb") as f:
        pq.write_table(table, f)
