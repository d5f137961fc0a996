"""How well a reranker ranks, per task: text retrieval (TREC DL 2019/2020, nDCG@10), multilingual QA (XQuAD-R,
R@10), function calling (BFCL, R@3), SQL table schemas (Spider, R@3) and code search (CoSQA, RR@10).

    python -m jobs.eval_suite --model NAME_OR_PATH [--dtype ...] [--reference-dtype ...]
                              [--collections trec_dl19,bfcl] [--max-queries N] [--output results.json]
                              [--config-dir configs/eval] [--config suite.yaml]
                              [--set collections.cosqa.arguments.pool_size=100 ...]

Each `configs/eval/<name>.yaml` names a converter of `pipeline.datasets` and its arguments, the measures
(ir_measures notation, trec_eval's conventions, see `pipeline.quality.metrics`; the first is the table's
column) and optional segments. The suite scores every (query, candidate) pair with
`CrossEncoder.compute_score` in-process, ranks by the raw logit and evaluates against the collection's qrels;
where the candidates come with a first-stage score (TREC DL's BM25) that ranking is evaluated too. A decoder
reranker reads each pair through its prompt template: `scoring.template` and `scoring.instruction` set them as
the rerank job's `tokenizer.template` and `tokenizer.instruction` do.
It prints the table and writes everything to `--output` as JSON (a local path or an object-storage URI).
With `--model dummy:tiny` (random weights) it runs anywhere in seconds; the numbers then mean nothing.

What a dtype costs in ranking quality: with `--reference-dtype DTYPE` the same weights are loaded a second time
at DTYPE (once for the whole suite) and every collection is scored twice on the same pairs, by the model at
`--dtype` and by this reference. `--dtype int8` alone is compared with `auto`: bfloat16 where the CPU or GPU
computes it fast, float32 otherwise; the dtype that really ran names the reference's columns and is recorded
in the JSON. The table adds the reference's value of the first measure, the difference (model minus
reference) and its 95% interval. The JSON adds, per collection, the reference's measures, the difference of
each, a paired per-query comparison of the first measure (mean difference, 95% percentile bootstrap interval
over queries, p-value of a paired randomization test) and how close the two sets of scores are: the largest
|difference of logits|, the Spearman correlation of the two score lists and the share of the reference's
top 10 that the model also ranks in its top 10, averaged over the queries with more than 10 candidates.
"""

from __future__ import annotations

import argparse
import logging
import math
import posixpath
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipeline.benchmark.fidelity import fidelity
from pipeline.core import schema
from pipeline.core.cli import DTYPES, base_parser, run_main, setup_logging
from pipeline.core.config import (
    StrictModel,
    build_config,
    config_hash,
    merge_dicts,
    parse_overrides,
    read_yaml,
    redact,
)
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.storage import url_to_fs, write_json
from pipeline.datasets import COLLECTIONS, check_arguments, load_collection, sample_queries
from pipeline.model import CrossEncoder
from pipeline.quality.compare import paired_p_value
from pipeline.quality.metrics import evaluate, means, parse_measure
from pipeline.quality.report import BOOTSTRAP_METHOD, CONFIDENCE, bootstrap_interval
from pipeline.quality.segments import query_segments, segment_means

log = logging.getLogger("jobs.eval_suite")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


class CollectionConfig(StrictModel):
    """One row of the table: a collection, how to build its candidates, what to measure."""

    title: str  # the row's name in the table
    order: int = 0  # rows are sorted by (order, file name)
    collection: str  # a converter in pipeline.datasets (trec_dl, xquad_r, ...)
    arguments: dict[str, Any] = {}  # the converter's keyword arguments (year, languages, ...)
    measures: list[str] = Field(
        min_length=1
    )  # ir_measures notation; the first is the table's column
    relevance_level: int = 1  # label >= this is relevant for binary measures (trec_eval -l)
    max_queries: int | None = Field(None, ge=1)  # a seeded sample of whole queries; None: all
    seed: int = 0  # seed of that sample
    segment_by: list[str] = []  # query-level columns that split every measure (language)

    @field_validator("collection")
    @classmethod
    def _known_collection(cls, value: str) -> str:
        if value not in COLLECTIONS:
            raise ValueError(
                f"unknown collection {value!r}; known: {', '.join(sorted(COLLECTIONS))}"
            )
        return value

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, value: list[str]) -> list[str]:
        try:
            return [str(parse_measure(m)) for m in value]
        except InputError as e:  # pydantic reports ValueError with the key's location
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _known_arguments(self) -> CollectionConfig:
        try:
            check_arguments(self.collection, self.arguments)
        except InputError as e:
            raise ValueError(f"arguments: {e}") from None
        return self


class ScoringConfig(StrictModel):
    device: str | None = None  # cuda, cpu, ...; None: CUDA when available
    max_length: int = Field(
        1024, ge=8
    )  # tokens per pair; longer pairs are truncated (jina's default)
    batch_size: int | None = Field(
        None, ge=1
    )  # pairs per micro-batch cap; None: the token budget decides
    max_tokens_per_batch: int | None = Field(
        None, ge=1
    )  # None: the engine's default for the device
    # Decoder rerankers (Qwen3-Reranker...): the prompt template and its instruction, as the rerank job's
    # tokenizer.template and tokenizer.instruction (null: the model's own, and the template's default).
    template: str | None = None
    instruction: str | None = None


class SuiteConfig(StrictModel):
    data_dir: str | None = None  # the shared data folder; None: $SHARED_DATA or ../shared/data
    output: str = "eval_suite_results.json"  # JSON results (path or URI)
    scoring: ScoringConfig = ScoringConfig()
    collections: dict[str, CollectionConfig] = Field(min_length=1)


def load_suite_config(
    config_dir: str | Path = CONFIG_DIR,
    path: str | None = None,
    overrides: Sequence[str] = (),
    collections: Sequence[str] | None = None,
    max_queries: int | None = None,
    output: str | None = None,
) -> SuiteConfig:
    """Collections from `config_dir/*.yaml` (the file stem is the key), then `--config`, then `--set`, then
    the explicit flags: `collections` keeps those named (in that order), `max_queries` applies to each."""
    files = sorted(Path(config_dir).glob("*.yaml"))
    if not files:
        raise ConfigError(
            f"no *.yaml collection configs in {config_dir}; pass --config-dir (see configs/eval/)"
        )
    data: dict[str, Any] = {"collections": {f.stem: read_yaml(str(f)) for f in files}}
    by_order = sorted(
        data["collections"], key=lambda name: (data["collections"][name].get("order", 0), name)
    )
    data["collections"] = {name: data["collections"][name] for name in by_order}
    if path:
        data = merge_dicts(data, read_yaml(path))
    data = merge_dicts(data, parse_overrides(overrides))
    if collections:
        unknown = [c for c in collections if c not in data["collections"]]
        if unknown:
            raise ConfigError(
                f"unknown collection(s) {unknown} in --collections; configured: "
                f"{', '.join(data['collections'])}"
            )
        data["collections"] = {c: data["collections"][c] for c in collections}
    if max_queries is not None:
        for entry in data["collections"].values():
            entry["max_queries"] = max_queries
    if output:
        data["output"] = output
    return build_config(SuiteConfig, data)


def load_encoder(model: str, dtype: str | None, scoring: ScoringConfig) -> CrossEncoder:
    """The model as `scoring` asks for it, refused in one line when a decoder's prompt leaves
    `scoring.max_length` no room for text (it would fail at the first pair, after loading the data)."""
    encoder = CrossEncoder.from_pretrained(
        model,
        device=scoring.device,
        dtype=dtype,
        template=scoring.template,
        instruction=scoring.instruction,
    )
    prompt = encoder.tokenizer.prompt
    if prompt is not None and min(scoring.max_length, encoder.max_length) < prompt.min_length:
        raise ConfigError(
            f"scoring.max_length={scoring.max_length} leaves no room for text in the "
            f"{prompt.template.name} prompt of {model}; use at least {prompt.min_length}"
        )
    return encoder


def _ranking(pairs: pa.Table, scores) -> pa.Table:
    """(query_id, doc_id, score: float64), the run format of `pipeline.quality.metrics.evaluate`."""
    return pa.table(
        {
            schema.QUERY_ID: pairs[schema.QUERY_ID],
            schema.DOC_ID: pairs[schema.DOC_ID],
            schema.SCORE: pa.array(np.asarray(scores, dtype=np.float64)),
        }
    )


def _score(
    encoder: CrossEncoder, texts: list[tuple[str, str]], scoring: ScoringConfig
) -> tuple[np.ndarray, float]:
    """Raw logits (n,) float32 of the (query, document) pairs in their order, and the seconds it took."""
    start = time.perf_counter()
    logits = encoder.compute_score(
        texts,
        return_logits=True,
        max_length=scoring.max_length,
        batch_size=scoring.batch_size,
        max_tokens_per_batch=scoring.max_tokens_per_batch,
    )
    return np.atleast_1d(np.asarray(logits, dtype=np.float32)), time.perf_counter() - start


def _speed(num_pairs: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 3),
        "pairs_per_second": round(num_pairs / seconds, 1) if seconds else None,
    }


def paired_comparison(model: pa.Table, reference: pa.Table, measure: str) -> dict:
    """One measure, model vs reference, paired by query: per-query tables (query_id, <measure>: float64) ->
    the mean of the per-query differences (model - reference), its bootstrap interval and the paired
    randomization test's p-value (the nightly comparison's test, `pipeline.quality.compare`)."""
    paired = model.select([schema.QUERY_ID, measure]).join(
        reference.select([schema.QUERY_ID, measure]),
        keys=schema.QUERY_ID,
        right_suffix=".reference",
    )
    paired = paired.drop_null()
    ours = paired[measure].to_numpy().astype(np.float64)  # (queries,)
    theirs = paired[f"{measure}.reference"].to_numpy().astype(np.float64)  # (queries,)
    interval = bootstrap_interval(ours - theirs)
    return {
        "measure": measure,
        "num_queries": len(ours),
        "mean_delta": float(np.mean(ours - theirs)) if len(ours) else None,
        "interval": None if interval is None else list(interval),
        "confidence": CONFIDENCE,
        "interval_method": BOOTSTRAP_METHOD,
        "p_value": paired_p_value(ours, theirs) if len(ours) >= 2 else None,
        "test": "two-sided paired randomization (sign-flip) test of the mean difference",
    }


def _finite_or_none(value: float | None) -> float | None:
    # Spearman is undefined (NaN) when either score list is constant; JSON has no NaN.
    return None if value is None or not math.isfinite(value) else value


def evaluate_collection(
    encoder: CrossEncoder,
    config: CollectionConfig,
    scoring: ScoringConfig,
    data_dir: str | None = None,
    reference: CrossEncoder | None = None,
) -> dict:
    """Score one collection's pairs with `encoder` and measure the reranked order (and the first stage's).

    With `reference` (the same weights at another dtype) the same pairs are scored again by it; the result's
    "reference" block holds its dtype, measures, the delta of each measure (model - reference), the paired
    per-query comparison of the first measure and the fidelity of the model's logits to the reference's.
    """
    pairs, qrels = load_collection(config.collection, data_dir, **config.arguments)
    pairs, qrels = sample_queries(pairs, qrels, config.max_queries, config.seed)
    texts = list(zip(pairs[schema.QUERY].to_pylist(), pairs[schema.DOCUMENT].to_pylist()))
    logits, seconds = _score(encoder, texts, scoring)
    per_query = evaluate(_ranking(pairs, logits), qrels, config.measures, config.relevance_level)
    result = {
        "title": config.title,
        "collection": config.collection,
        "measure": config.measures[0],
        "measures": means(per_query),
        "num_queries": per_query.num_rows,
        "num_pairs": pairs.num_rows,
        **_speed(pairs.num_rows, seconds),
    }
    result["value"] = result["measures"][config.measures[0]]
    if schema.FIRST_STAGE_SCORE in pairs.column_names:
        first_stage = evaluate(
            _ranking(pairs, pairs[schema.FIRST_STAGE_SCORE]),
            qrels,
            config.measures,
            config.relevance_level,
        )
        result["first_stage_measures"] = means(first_stage)
    if config.segment_by:
        result["segments"] = segment_means(
            per_query, query_segments(pairs, config.segment_by), config.segment_by
        )
    log.info(
        "%s: %s = %.4f over %d queries (%d pairs, %.1f s)",
        config.title,
        config.measures[0],
        result["value"],
        result["num_queries"],
        result["num_pairs"],
        seconds,
    )
    if reference is not None:
        reference_logits, reference_seconds = _score(reference, texts, scoring)
        reference_per_query = evaluate(
            _ranking(pairs, reference_logits), qrels, config.measures, config.relevance_level
        )
        reference_measures = means(reference_per_query)
        # Both rankings cover the same pairs and qrels, so the same queries: the difference of the means is
        # the mean of the per-query differences (up to rounding), and the paired block says how sure it is.
        figures = fidelity(
            reference_logits, logits, pairs[schema.QUERY_ID].cast(pa.string()).to_pylist()
        )
        figures["spearman"] = _finite_or_none(figures["spearman"])
        result["reference"] = {
            "dtype": reference.describe()["dtype"],
            "measures": reference_measures,
            "value": reference_measures[config.measures[0]],
            "delta": {m: result["measures"][m] - reference_measures[m] for m in result["measures"]},
            "paired": paired_comparison(per_query, reference_per_query, config.measures[0]),
            "fidelity": figures,
            **_speed(pairs.num_rows, reference_seconds),
        }
        log.info(
            "%s: %s = %.4f at %s (delta %+.4f), max |delta logit| %.4g",
            config.title,
            config.measures[0],
            result["reference"]["value"],
            result["reference"]["dtype"],
            result["reference"]["delta"][config.measures[0]],
            figures["max_abs_logit_diff"],
        )
    return result


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def format_table(model: str, results: dict[str, dict], reference_dtype: str | None = None) -> str:
    """One row per collection, the first stage beside the model where there is one (the release post's table);
    with a reference, its value, the delta (model - reference) and the delta's 95% interval over queries."""
    header = ["collection", "measure", "queries", "pairs", "first stage", model]
    if reference_dtype:
        header += [reference_dtype, f"Δ vs {reference_dtype}", f"{CONFIDENCE:.0%} interval of Δ"]
    header.append("pairs/s")
    rows = []
    for result in results.values():
        first_stage = result.get("first_stage_measures", {}).get(result["measure"])
        row = [
            result["title"],
            result["measure"],
            str(result["num_queries"]),
            str(result["num_pairs"]),
            "-" if first_stage is None else f"{first_stage:.4f}",
            f"{result['value']:.4f}",
        ]
        if reference_dtype:
            reference = result["reference"]
            interval = reference["paired"]["interval"]
            row += [
                f"{reference['value']:.4f}",
                _signed(reference["delta"][result["measure"]]),
                "-" if interval is None else f"{_signed(interval[0])} to {_signed(interval[1])}",
            ]
        row.append(
            "-" if result["pairs_per_second"] is None else f"{result['pairs_per_second']:.0f}"
        )
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "python -m jobs.eval_suite",
        " ".join(__doc__.split("\n\n")[0].split()),
        set_example="scoring.max_tokens_per_batch=8192",
        instruction_key="scoring.instruction",
    )
    parser.add_argument(
        "--collections",
        default=None,
        type=lambda s: [c for c in s.split(",") if c],
        help="comma-separated collection names (config file stems); default: all",
    )
    parser.add_argument(
        "--max-queries",
        type=int,
        default=None,
        help="score a seeded sample of N queries per collection",
    )
    parser.add_argument(
        "--output", default=None, help="results JSON (path or URI); default from the config"
    )
    parser.add_argument(
        "--config-dir", default=str(CONFIG_DIR), help="folder of per-collection YAML configs"
    )
    parser.add_argument(
        "--reference-dtype",
        choices=DTYPES,
        default=None,
        help="also score every collection with the same weights at this dtype and report the "
        "model's difference from it: each measure's delta with a 95%% interval, max |delta logit|, "
        "Spearman and top-10 overlap (default: auto when --dtype is int8, none otherwise; the "
        "dtype auto resolved to names the reference's columns and is in the JSON)",
    )
    # The comparison's paragraph of the docstring, so that --help says what the reference adds.
    parser.epilog = " ".join(
        next(p for p in __doc__.split("\n\n") if "`--reference-dtype DTYPE`" in p).split()
    )
    return parser


def reference_dtype(dtype: str | None, asked: str | None) -> str | None:
    """The dtype to compare the model with: the one asked for; for int8 and float8 by default `auto` (they are only
    ever chosen by name, and what they cost against the dtype the engine would otherwise pick is the question)."""
    if asked is not None:
        return asked
    return "auto" if dtype in ("int8", "float8") else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = load_suite_config(
        args.config_dir,
        args.config,
        args.overrides,
        args.collections,
        args.max_queries,
        args.output,
    )
    # A bad output location should fail before minutes of scoring, not after.
    fs, output_path = url_to_fs(config.output)
    fs.makedirs(posixpath.dirname(output_path), exist_ok=True)
    encoder = load_encoder(args.model, args.dtype, config.scoring)
    # Loaded once for the whole suite: a second copy of the weights, at the reference's dtype.
    compare_with = reference_dtype(args.dtype, args.reference_dtype)
    reference = (
        None if compare_with is None else load_encoder(args.model, compare_with, config.scoring)
    )
    results = {
        name: evaluate_collection(encoder, entry, config.scoring, config.data_dir, reference)
        for name, entry in config.collections.items()
    }
    if reference is None:
        print(format_table(args.model, results))
    else:  # two columns of the same weights: each names its dtype
        print(
            format_table(
                f"{args.model} ({encoder.describe()['dtype']})",
                results,
                reference.describe()["dtype"],
            )
        )
    if encoder.is_dummy:
        print(f"note: {args.model} has random weights; its column measures nothing")
    summary = {
        "model": encoder.describe(),
        "config": redact(config.model_dump(mode="json")),
        "config_hash": config_hash(config),
        "collections": results,
        "order": list(results),
    }  # write_json sorts keys; this keeps the table's order
    if reference is not None:
        summary["reference_model"] = reference.describe()
    write_json(fs, output_path, summary)
    log.info("results: %s", config.output)
    return 0


if __name__ == "__main__":
    run_main(main)
