"""Reading the reranked candidates back with their texts, and writing the outputs (local paths, s3://...).

Input: the rerank job's `ranked/` (scores, first-stage and other carried columns) joined by (query_id, doc_id)
with the texts of --input, which are read by the rerank job's own read stage (same formats, same settings).

Output layout under --output (stats.json is written last: its presence means the run finished):
    rerank/                            the rerank job's output (ranked/, rejected/, summary.json); a rerun
                                       with other selection settings reuses it instead of scoring again
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.errors import InputError
from pipeline.hard_negatives import projections as proj
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.stats import compute_stats
from pipeline.rerank_config import RerankConfig
from pipeline.stages.read import ReadShard, list_input_files, plan_shards, read_schemas
from pipeline.stages.validate import InputLayout
from pipeline.storage import join, url_to_fs, write_json

METADATA_KEY = b"hard_negatives"
CANDIDATES = "candidates"
STATS = "stats.json"
PART = "part-00000.parquet"


def read_texts(input_uri: str, rerank: RerankConfig) -> pa.Table:
    """The input's texts, read as the rerank job reads them (long or grouped Parquet, its column settings).

    -> (query_id: string, query: string, doc_id: string, document: string), one row per (query_id, doc_id)
    that the rerank scores: rows it rejects (empty text, missing id) are left out, and a repeated pair keeps
    its first row in input order, as the rerank's ranking stage does.
    """
    fs, files = list_input_files(input_uri, rerank.storage_options)
    layout = input_layout(fs, files, rerank)
    names = [schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT]
    reader = ReadShard(layout, rerank.storage_options, input_uri)
    shards = plan_shards(fs, files, layout, rerank.input.rows_per_shard)
    tables = [reader.read(shard) for shard in shards]
    texts = pa.concat_tables(tables) if tables else layout.empty_rows()
    texts = texts.filter(pc.is_null(texts[schema.REASON]))
    texts = pa.table({name: texts[name].cast(pa.string()) for name in names})
    order = pa.array(np.arange(texts.num_rows, dtype=np.int64))
    first = texts.append_column("_order", order).group_by([schema.QUERY_ID, schema.DOC_ID]).aggregate(
        [("_order", "min")])
    return texts.take(np.sort(first["_order_min"].to_numpy()))


def input_layout(fs, files: list[str], rerank: RerankConfig) -> InputLayout:
    """The rerank job's view of the input's columns, from the Parquet schemas alone (no data read)."""
    return InputLayout.from_schemas(read_schemas(fs, files), rerank.input)


def read_ranked(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The rerank job's `ranked/` Parquet (query_id, doc_id, score, rank, carried columns such as
    first_stage_rank, first_stage_score, label), with string ids and the score as float32."""
    fs, path = url_to_fs(uri, storage_options)
    table = pq.read_table(path, filesystem=fs)
    for name, dtype in ((schema.QUERY_ID, pa.string()), (schema.DOC_ID, pa.string()), (schema.SCORE, pa.float32())):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(dtype))
    return table


def join_texts(ranked: pa.Table, texts: pa.Table) -> pa.Table:
    """The reranker's rows with their query and document texts, joined by (query_id, doc_id).

    Both sides must hold the same pairs; they differ only when the input changed after rerank/ was written.
    """
    scored = ranked.join(texts, keys=[schema.QUERY_ID, schema.DOC_ID], join_type="inner")
    if scored.num_rows != ranked.num_rows or scored.num_rows != texts.num_rows:
        raise InputError(f"the input holds {texts.num_rows:,} scorable pairs but the rerank scored "
                         f"{ranked.num_rows:,} ({scored.num_rows:,} in common): the input changed after its "
                         "rerank/ folder was written; delete <output>/rerank to score it again")
    return scored


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
