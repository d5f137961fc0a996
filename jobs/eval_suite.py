"""How well a reranker ranks, per task: text retrieval (TREC DL 2019/2020, nDCG@10), multilingual QA (XQuAD-R,
R@10), function calling (BFCL, R@3), SQL table schemas (Spider, R@3) and code search (CoSQA, RR@10).

    python -m jobs.eval_suite --model NAME_OR_PATH [--dtype ...] [--collections trec_dl19,bfcl]
                              [--max-queries N] [--output results.json] [--config-dir configs/eval]
                              [--config suite.yaml] [--set collections.cosqa.arguments.pool_size=100 ...]

Each `configs/eval/<name>.yaml` names a converter of `pipeline.datasets` and its arguments, the measures
(ir_measures notation, trec_eval's conventions, see `pipeline.quality.metrics`; the first is the table's
column) and optional segments. The suite scores every (query, candidate) pair with
`CrossEncoder.compute_score` in-process, ranks by the raw logit and evaluates against the collection's qrels;
where the candidates come with a first-stage score (TREC DL's BM25) that ranking is evaluated too.
It prints the table and writes everything to `--output` as JSON (a local path or an object-storage URI).
With `--model dummy:tiny` (random weights) it runs anywhere in seconds; the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipeline import schema
from pipeline.cli import base_parser, run_main, setup_logging
from pipeline.config import StrictModel, merge_dicts, build_config, config_hash, parse_overrides, read_yaml, redact
from pipeline.datasets import COLLECTIONS, check_arguments, load_collection, sample_queries
from pipeline.errors import ConfigError, InputError
from pipeline.model import CrossEncoder
from pipeline.quality.metrics import evaluate, means, parse_measure
from pipeline.quality.segments import query_segments, segment_means
from pipeline.storage import url_to_fs, write_json

log = logging.getLogger("jobs.eval_suite")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


class CollectionConfig(StrictModel):
    """One row of the table: a collection, how to build its candidates, what to measure."""

    title: str                                     # the row's name in the table
    order: int = 0                                 # rows are sorted by (order, file name)
    collection: str                                # a converter in pipeline.datasets (trec_dl, xquad_r, ...)
    arguments: dict[str, Any] = {}                 # the converter's keyword arguments (year, languages, ...)
    measures: list[str] = Field(min_length=1)      # ir_measures notation; the first is the table's column
    relevance_level: int = 1                       # label >= this is relevant for binary measures (trec_eval -l)
    max_queries: int | None = Field(None, ge=1)    # a seeded sample of whole queries; None: all
    seed: int = 0                                  # seed of that sample
    segment_by: list[str] = []                     # query-level columns that split every measure (language)

    @field_validator("collection")
    @classmethod
    def _known_collection(cls, value: str) -> str:
        if value not in COLLECTIONS:
            raise ValueError(f"unknown collection {value!r}; known: {', '.join(sorted(COLLECTIONS))}")
        return value

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, value: list[str]) -> list[str]:
        try:
            return [str(parse_measure(m)) for m in value]
        except InputError as e:  # pydantic reports ValueError with the key's location
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _known_arguments(self) -> "CollectionConfig":
        try:
            check_arguments(self.collection, self.arguments)
        except InputError as e:
            raise ValueError(f"arguments: {e}") from None
        return self


class ScoringConfig(StrictModel):
    device: str | None = None                # cuda, cpu, ...; None: CUDA when available
    max_length: int = Field(1024, ge=8)      # tokens per pair; longer pairs are truncated (jina's default)
    batch_size: int | None = Field(None, ge=1)             # pairs per micro-batch cap; None: the token budget decides
    max_tokens_per_batch: int | None = Field(None, ge=1)   # None: the engine's default for the device


class SuiteConfig(StrictModel):
    data_dir: str | None = None              # the shared data folder; None: $SHARED_DATA or ../shared/data
    output: str = "eval_suite_results.json"  # JSON results (path or URI)
    scoring: ScoringConfig = ScoringConfig()
    collections: dict[str, CollectionConfig] = Field(min_length=1)


def load_suite_config(config_dir: str | Path = CONFIG_DIR, path: str | None = None, overrides: Sequence[str] = (),
                      collections: Sequence[str] | None = None, max_queries: int | None = None,
                      output: str | None = None) -> SuiteConfig:
    """Collections from `config_dir/*.yaml` (the file stem is the key), then `--config`, then `--set`, then
    the explicit flags: `collections` keeps those named (in that order), `max_queries` applies to each."""
    files = sorted(Path(config_dir).glob("*.yaml"))
    if not files:
        raise ConfigError(f"no *.yaml collection configs in {config_dir}; pass --config-dir (see configs/eval/)")
    data: dict[str, Any] = {"collections": {f.stem: read_yaml(str(f)) for f in files}}
    by_order = sorted(data["collections"], key=lambda name: (data["collections"][name].get("order", 0), name))
    data["collections"] = {name: data["collections"][name] for name in by_order}
    if path:
        data = merge_dicts(data, read_yaml(path))
    data = merge_dicts(data, parse_overrides(overrides))
    if collections:
        unknown = [c for c in collections if c not in data["collections"]]
        if unknown:
            raise ConfigError(f"unknown collection(s) {unknown} in --collections; configured: "
                              f"{', '.join(data['collections'])}")
        data["collections"] = {c: data["collections"][c] for c in collections}
    if max_queries is not None:
        for entry in data["collections"].values():
            entry["max_queries"] = max_queries
    if output:
        data["output"] = output
    return build_config(SuiteConfig, data)


def _ranking(pairs: pa.Table, scores) -> pa.Table:
    """(query_id, doc_id, score: float64), the run format of `pipeline.quality.metrics.evaluate`."""
    return pa.table({schema.QUERY_ID: pairs[schema.QUERY_ID], schema.DOC_ID: pairs[schema.DOC_ID],
                     schema.SCORE: pa.array(np.asarray(scores, dtype=np.float64))})


def evaluate_collection(encoder: CrossEncoder, config: CollectionConfig, scoring: ScoringConfig,
                        data_dir: str | None = None) -> dict:
    """Score one collection's pairs with `encoder` and measure the reranked order (and the first stage's)."""
    pairs, qrels = load_collection(config.collection, data_dir, **config.arguments)
    pairs, qrels = sample_queries(pairs, qrels, config.max_queries, config.seed)
    texts = list(zip(pairs[schema.QUERY].to_pylist(), pairs[schema.DOCUMENT].to_pylist()))
    start = time.perf_counter()
    logits = encoder.compute_score(texts, return_logits=True, max_length=scoring.max_length,
                                   batch_size=scoring.batch_size, max_tokens_per_batch=scoring.max_tokens_per_batch)
    seconds = time.perf_counter() - start
    per_query = evaluate(_ranking(pairs, np.atleast_1d(logits)), qrels, config.measures, config.relevance_level)
    result = {
        "title": config.title, "collection": config.collection, "measure": config.measures[0],
        "measures": means(per_query), "num_queries": per_query.num_rows, "num_pairs": pairs.num_rows,
        "seconds": round(seconds, 3), "pairs_per_second": round(pairs.num_rows / seconds, 1) if seconds else None,
    }
    result["value"] = result["measures"][config.measures[0]]
    if schema.FIRST_STAGE_SCORE in pairs.column_names:
        first_stage = evaluate(_ranking(pairs, pairs[schema.FIRST_STAGE_SCORE]), qrels, config.measures,
                               config.relevance_level)
        result["first_stage_measures"] = means(first_stage)
    if config.segment_by:
        result["segments"] = segment_means(per_query, query_segments(pairs, config.segment_by), config.segment_by)
    log.info("%s: %s = %.4f over %d queries (%d pairs, %.1f s)", config.title, config.measures[0],
             result["value"], result["num_queries"], result["num_pairs"], seconds)
    return result


def format_table(model: str, results: dict[str, dict]) -> str:
    """One row per collection, the first stage beside the model where there is one (the release post's table)."""
    header = ["collection", "measure", "queries", "pairs", "first stage", model, "pairs/s"]
    rows = []
    for result in results.values():
        first_stage = result.get("first_stage_measures", {}).get(result["measure"])
        rows.append([result["title"], result["measure"], str(result["num_queries"]), str(result["num_pairs"]),
                     "-" if first_stage is None else f"{first_stage:.4f}", f"{result['value']:.4f}",
                     "-" if result["pairs_per_second"] is None else f"{result['pairs_per_second']:.0f}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("python -m jobs.eval_suite", " ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--collections", default=None, type=lambda s: [c for c in s.split(",") if c],
                        help="comma-separated collection names (config file stems); default: all")
    parser.add_argument("--max-queries", type=int, default=None, help="score a seeded sample of N queries per collection")
    parser.add_argument("--output", default=None, help="results JSON (path or URI); default from the config")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="folder of per-collection YAML configs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = load_suite_config(args.config_dir, args.config, args.overrides, args.collections, args.max_queries,
                               args.output)
    # A bad output location should fail before minutes of scoring, not after.
    fs, output_path = url_to_fs(config.output)
    fs.makedirs(posixpath.dirname(output_path), exist_ok=True)
    encoder = CrossEncoder.from_pretrained(args.model, device=config.scoring.device, dtype=args.dtype)
    results = {name: evaluate_collection(encoder, entry, config.scoring, config.data_dir)
               for name, entry in config.collections.items()}
    print(format_table(args.model, results))
    if encoder.is_dummy:
        print(f"note: {args.model} has random weights; its column measures nothing")
    write_json(fs, output_path, {"model": encoder.describe(), "config": redact(config.model_dump(mode="json")),
                                 "config_hash": config_hash(config), "collections": results,
                                 "order": list(results)})  # write_json sorts keys; this keeps the table's order
    log.info("results: %s", config.output)
    return 0


if __name__ == "__main__":
    run_main(main)
