"""Reading the reranked candidates back with their texts, and writing the outputs (local paths, s3://...).

Input: the rerank job's `ranked/` (scores, texts, first-stage and other carried columns), read through
`pipeline.rerank.api`: the rerank carries the texts (`output.carry_texts`), so --input is read once, by it.

Output layout under --output (stats.json is written last: its presence means the run finished). The job
writes parts (part-PPPPP, by hash(query_id); one part, part-00000 / train.jsonl, below
output.rows_per_part rows) from its actors, see buckets.py; `write_outputs` writes one part from one table:
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

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import join, url_to_fs, write_json
from pipeline.hard_negatives import projections as proj
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.stats import compute_stats
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.stages.read import read_schemas
from pipeline.rerank.stages.validate import InputLayout

METADATA_KEY = b"hard_negatives"
CANDIDATES = "candidates"
STATS = "stats.json"
PART = "part-00000.parquet"


def input_layout(fs, files: list[str], rerank: RerankConfig) -> InputLayout:
    """The rerank job's view of the input's columns, from the Parquet schemas alone (no data read)."""
    return InputLayout.from_schemas(read_schemas(fs, files), rerank.input)


def with_run_metadata(table: pa.Table, run: dict) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(run, sort_keys=True).encode()})


def read_run_metadata(parquet_schema: pa.Schema) -> dict:
    return json.loads(parquet_schema.metadata[METADATA_KEY])


def write_outputs(
    output: str,
    canonical: pa.Table,
    texts: pa.Table,
    config: HardNegativesConfig,
    run: dict,
    qrels: pa.Table | None = None,
    unscored: int | None = None,
) -> dict:
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
            counts["n_tuple_rows_left_out_short"] = proj.tuple_rows_short(
                examples, config.selection
            )
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
