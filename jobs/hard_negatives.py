"""python -m jobs.hard_negatives --input URI --positives URI --output URI --model NAME_OR_PATH [--dtype ...] [--config FILE] [--set k=v ...]

Mines hard negatives for training: reranks every candidate with a cross-encoder (the rerank job, unchanged),
then keeps the hardest candidates that are safely below the query's weakest positive and never a positive.

--input      the rerank job's input (Parquet, long or grouped), with the first stage's rank (and score)
--positives  TREC qrels text or Parquet (query_id, doc_id, label); omit it when the input has a `label` column
--output     folder (local or s3://): candidates/ (every candidate with keep + drop_reason), triplet/, n-tuple/,
             flagembedding/ (as configured), rerank/ (the scores, reused by reruns), stats.json (last)

Exit status: 0 = written; 2 = bad input or config (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.core.cli import base_parser, check_job_location, run_main, setup_logging
from pipeline.core.config import load_config
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.job import run_hard_negatives
from pipeline.hard_negatives.stats import format_summary


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "python -m jobs.hard_negatives",
        " ".join(__doc__.split("\n\n")[1].split()),
        model_required=False,
        set_example="rerank.scorer.max_tokens_per_batch=8192",
    )
    parser.add_argument(
        "--input", required=True, help="Parquet file, folder or glob: local path or s3://..."
    )
    parser.add_argument(
        "--positives", default=None, help="TREC qrels text or Parquet (query_id, doc_id, label)"
    )
    parser.add_argument(
        "--output", required=True, help="output folder: local path or object-storage URI"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_job_location(args.output)
    config = load_config(
        HardNegativesConfig,
        args.config,
        args.overrides,
        rerank__model=args.model,
        rerank__dtype=args.dtype,
    )
    stats = run_hard_negatives(config, args.input, args.positives, args.output)
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    run_main(main)
