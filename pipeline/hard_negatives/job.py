"""The hard-negative job's driver: check inputs, rerank through the rerank job, select, write.

    positives (qrels, or the input's label column) checked first, before any scoring
    -> run_rerank(input -> <output>/rerank/)        the rerank pipeline and engine, unchanged
    -> ranked/ read back + the input's texts         joined by (query_id, doc_id)
    -> select_negatives -> canonical table, projections, stats.json (last)

<output>/rerank/ is the rerank job's own output, so its resume applies: an interrupted run continues where it
stopped, and a rerun with other selection or projection settings reuses the scores (it never rescores
with the same rerank settings; other rerank settings are refused, so scores never mix).
"""

from __future__ import annotations

import logging

import pyarrow as pa

from pipeline import schema
from pipeline.config import config_hash, redact
from pipeline.errors import InputError
from pipeline.hard_negatives import io
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.select import select_negatives
from pipeline.rerank_job import run_rerank, settings_hash
from pipeline.stages.read import list_input_files
from pipeline.storage import join, read_json, url_to_fs
from pipeline.trec import read_qrels

log = logging.getLogger("hard_negatives")

RERANK = "rerank"


def read_positives(config: HardNegativesConfig, input_uri: str, positives_uri: str | None) -> pa.Table | None:
    """The qrels table (TREC qrels text or Parquet), or None when the input's `label` column says instead."""
    if positives_uri is not None:
        return read_qrels(positives_uri, config.storage_options)
    rerank = config.rerank_config()
    fs, files = list_input_files(input_uri, rerank.storage_options)
    if schema.LABEL not in io.input_layout(fs, files, rerank).carried_names:
        raise InputError("no positives: pass --positives (TREC qrels text or Parquet query_id, doc_id, label) "
                         f"or give the input a `{schema.LABEL}` column (label >= selection.min_positive_label "
                         "is a positive)")
    return None


def check_reusable_scores(config: HardNegativesConfig, output_uri: str) -> None:
    """A finished rerank/ written with other result-changing settings (another model, say) is refused: the
    rerank job returns a finished output as it is, so reusing it silently would mix in other scores."""
    fs, root = url_to_fs(join(output_uri, RERANK), config.storage_options)
    summary_path = join(root, "summary.json")
    if not fs.exists(summary_path):
        return
    previous = read_json(fs, summary_path)
    if previous.get("config_hash") != settings_hash(config.rerank_config()):
        raise InputError(f"{join(output_uri, RERANK)} holds scores from other rerank settings (model there: "
                         f"{previous.get('model')!r}); use another --output, or delete that folder to score again")


def run_hard_negatives(config: HardNegativesConfig, input_uri: str, positives_uri: str | None,
                       output_uri: str) -> dict:
    """Mine `input_uri` into `output_uri`; returns the stats (also written to stats.json)."""
    qrels = read_positives(config, input_uri, positives_uri)
    check_reusable_scores(config, output_uri)
    rerank = config.rerank_config()
    rerank_uri = join(output_uri, RERANK)
    summary = run_rerank(rerank, input_uri, rerank_uri)

    ranked = io.read_ranked(join(rerank_uri, "ranked"), config.storage_options)
    scored = io.join_texts(ranked, io.read_texts(input_uri, rerank))
    log.info("selecting negatives among %s scored pairs (%s rejected by the rerank, see %s)",
             f"{scored.num_rows:,}", f"{summary['rejected_rows']:,}", join(rerank_uri, "rejected"))
    canonical = select_negatives(scored, config.selection, qrels)
    run = {
        "model": summary["model"], "revision": summary["revision"], "dtype": summary["dtype"],
        "random_weights": summary["random_weights"], "seed": config.selection.seed,
        "config_hash": config_hash(config), "config": redact(config.model_dump(mode="json")),
    }
    return io.write_outputs(output_uri, canonical, scored, config, run, qrels, unscored=summary["rejected_rows"])
