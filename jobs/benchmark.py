"""Side-by-side reranking throughput and fidelity: sentence-transformers, transformers, ONNX Runtime, OpenVINO
and our engine, same weights, same data.

    python -m jobs.benchmark [--workloads dl19,long,multilingual] [--models jina-reranker-v2-base,bge-reranker-v2-m3]
                             [--contenders st-default,st-best,hf-padded,hf-sorted,engine,...] [--n-pairs N]
                             [--rounds R] [--output results/benchmark-cpu.json] [--config FILE] [--set key=value ...]

The default run puts every contender on the jina shape's DL19 pairs, sentence-transformers' default and best
and the engine also on its long and multilingual pairs, and those three on the bge shape's DL19 pairs
(`contender_scope`, DEFAULT_SCOPE in pipeline/benchmark/config.py: the full matrix would take ~40 minutes on 2
cores). An explicit --models, --workloads or --contenders runs exactly that selection on everything (so does
--set 'contender_scope={}'), e.g. the CPU runtimes on long documents too:

    python -m jobs.benchmark --models jina-reranker-v2-base --workloads dl19,long --contenders engine,ort-int8,ov-default,ov-int8

Decoder rerankers and ModernBERT side by side with the libraries (a Qwen3-Reranker seq-cls checkpoint: every
contender scores the same prompts, none truncated; the ONNX Runtime and OpenVINO rows say skipped):

    python -m jobs.benchmark --models qwen3-reranker-0.6b,modernbert-base --workloads dl19 --contenders engine,st-default,st-best,hf-padded,hf-sorted

Every contender loads the same random-weight checkpoint (the real model's shape, a tokenizer trained on the
workloads' text; `RERANKER_CHECKPOINT=<dir>` benchmarks a real checkpoint instead) and scores the same
pairs in a process of its own. Per contender and workload: pairs/s, real tokens/s, padding efficiency,
peak RSS, MFU (model FLOPs/s over the peak GEMM FLOP/s of its dtype, measured in the same run), the
engine's speedup over it, and its fidelity to a float32 reference on the same pairs (sentence-transformers'
default when it scores every pair in float32, else transformers in float32, hf-fp32; run first): max
|Δlogit|, Spearman, mean per-query top-10 overlap. Writes the JSON report to --output, the markdown table
beside it (.md), and prints the table.
Defaults (pairs per workload etc.): `pipeline/benchmark/config.py`. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.benchmark.config import BenchmarkConfig
from pipeline.benchmark.report import markdown_table, write_report
from pipeline.benchmark.runner import run_benchmark
from pipeline.core.cli import JobArgumentParser, run_main, setup_logging
from pipeline.core.config import load_config

log = logging.getLogger("jobs.benchmark")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m jobs.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workloads", type=_names, default=None, help="comma-separated: dl19,long,multilingual"
    )
    parser.add_argument(
        "--models",
        type=_names,
        default=None,
        help="comma-separated dummy architectures: jina-reranker-v2-base,bge-reranker-v2-m3,"
        "modernbert-base,gte-multilingual-reranker-base,qwen3-reranker-0.6b,...",
    )
    parser.add_argument(
        "--contenders",
        type=_names,
        default=None,
        help="comma-separated: st-default,st-best,hf-padded,hf-sorted,engine,ray-job,engine-fp32,"
        "engine-int8,ort-fp32,ort-int8,ov-fp32,ov-default,ov-int8,hf-fp32 (default: all but "
        "hf-fp32, which runs as the fidelity reference where st-default cannot be it)",
    )
    parser.add_argument(
        "--n-pairs",
        type=int,
        default=None,
        help="pairs per workload for every workload (float32 contenders score "
        "full_precision_pairs_fraction of them, 1.0 by default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="sweeps over the contenders; rows keep the fastest (default 1; 2-3 on a shared VM)",
    )
    parser.add_argument(
        "--output",
        default="results/benchmark-cpu.json",
        help="JSON report (local path or s3://...)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML config file (keys: pipeline/benchmark/config.py)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set tune_batch_sizes=[16,32] (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    explicit = {
        key: value
        for key, value in (
            ("workloads", args.workloads),
            ("models", args.models),
            ("contenders", args.contenders),
            ("rounds", args.rounds),
        )
        if value is not None
    }
    config = load_config(BenchmarkConfig, args.config, args.overrides, **explicit)
    if args.n_pairs is not None:
        config.n_pairs = {w: args.n_pairs for w in config.workloads}
    report = run_benchmark(config)
    table = markdown_table(report)
    table_path = write_report(
        args.output,
        report,
        table,
        "python -m jobs.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(table)
    log.info("report: %s (table: %s)", args.output, table_path)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    run_main(main)
