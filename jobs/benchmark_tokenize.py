"""How many CPU cores keep a GPU fed: the tokenize stage's pairs/s on one core, and what it implies per GPU.

    python -m jobs.benchmark_tokenize [--workloads dl19,long] [--n-pairs 2000] [--model jina-reranker-v2-base]
                                      [--gpu-tflops 989] [--output results/tokenize-cpu.json]

Runs the rerank job's own tokenize stage (truncation to --max-length, or jina's windows with
--long-documents windows) on the benchmark's workloads, pinned to one core, best of --repeats. The checkpoint
is the benchmark's (a tokenizer trained on the workloads' text, the model's shape; RERANKER_CHECKPOINT=<dir>
measures a real one). From the token counts it also gives the model FLOPs per pair, the pairs/s a GPU of
--gpu-tflops dense bf16 reaches on them at 100%, 50% and 30% MFU (not measured: no GPU is used), and so the
tokenizer cores per GPU: GPU pairs/s / pairs/s per core. Writes JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.benchmark.report import write_report
from pipeline.benchmark.tokenize_rate import H100_BF16_TFLOPS, markdown, run
from pipeline.core.cli import JobArgumentParser, run_main, setup_logging
from pipeline.rerank.config import TokenizerConfig

log = logging.getLogger("jobs.benchmark_tokenize")


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m jobs.benchmark_tokenize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workloads", default="dl19,long", help="comma-separated: dl19,long,multilingual"
    )
    parser.add_argument("--n-pairs", type=int, default=2000, help="pairs per workload")
    parser.add_argument(
        "--model",
        default="jina-reranker-v2-base",
        help="benchmark architecture (see jobs.benchmark)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="tokens per pair (the job's tokenizer.max_length)",
    )
    parser.add_argument("--long-documents", choices=["truncate", "windows"], default="truncate")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="rows per tokenizer call (tokenizer.batch_size)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=H100_BF16_TFLOPS,
        help="the GPU's dense bf16 peak (default: H100 SXM, 989)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: SHARED_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--output", default="results/tokenize-cpu.json", help="JSON report (local path or s3://...)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.benchmark.checkpoints import benchmark_checkpoint

    directory = benchmark_checkpoint(args.model, args.data_dir)
    config = TokenizerConfig(
        max_length=args.max_length, long_documents=args.long_documents, batch_size=args.batch_size
    )
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    report = run(
        directory, workloads, args.n_pairs, config, args.gpu_tflops, args.repeats, args.data_dir
    )
    table = markdown(report)
    write_report(
        args.output,
        report,
        table,
        "python -m jobs.benchmark_tokenize " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
