"""python -m jobs.rerank --input URI --output URI --model NAME_OR_PATH [--dtype ...] [--config FILE] [--set k=v ...]

Scores every (query, document) pair of a Parquet table with a cross-encoder on Ray Data and writes the
pairs ranked per query, the rejected rows with their reasons, and summary.json (last) under --output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from pipeline.core.cli import base_parser, check_job_location, run_main, setup_logging
from pipeline.core.config import load_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank
from pipeline.rerank.plan import StageClasses


def main(argv: Sequence[str] | None = None, stages: StageClasses | None = None) -> int:
    """The command; `stages` replaces the class of a step (a test injecting a fault at it)."""
    parser = base_parser(
        "python -m jobs.rerank", " ".join(__doc__.split("\n\n")[1].split()), model_required=False
    )
    parser.epilog = (
        "Exit status: 0 done (or already complete); 2 bad input, config, checkpoint or output location; "
        "3 infrastructure fault (storage unreachable, disk full): fix it and rerun to resume; "
        "4 unexpected error (run with -v for the traceback). Every failure is one `error:` line."
    )
    parser.add_argument(
        "--input",
        required=True,
        help="Parquet file, folder or glob: local path or s3://, gs://, file://",
    )
    parser.add_argument(
        "--output", required=True, help="output folder: local path or object-storage URI"
    )
    plan = parser.add_argument_group(
        "planning (--dry-run: read the input and a sample of it, score nothing, "
        "write nothing under --output)"
    )
    plan.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan: pairs, shards, sampled token lengths, expected cache hits, pool sizes "
        "and the wall time per GPU count, each rate named measured (source) or estimate",
    )
    plan.add_argument(
        "--dry-run-json", metavar="FILE", default=None, help="also write the plan as JSON to FILE"
    )
    plan.add_argument(
        "--gpus",
        default=None,
        metavar="N,N,...",
        help="GPU counts to estimate (default 1,2,4,...,256)",
    )
    plan.add_argument(
        "--deadline-hours",
        type=float,
        default=None,
        metavar="H",
        help="print the fewest GPUs that score the input within H hours",
    )
    plan.add_argument(
        "--sample-pairs",
        type=int,
        default=2000,
        metavar="N",
        help="pairs read and tokenized for the token lengths and cache hits (default 2,000)",
    )
    plan.add_argument(
        "--mfu",
        type=float,
        default=None,
        metavar="F",
        help="the MFU a GPU is assumed to reach when its rate is not measured (default 0.5)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    check_job_location(args.output)
    config = load_config(
        RerankConfig, args.config, args.overrides, model=args.model, dtype=args.dtype
    )
    if args.dry_run or args.dry_run_json or args.deadline_hours is not None or args.gpus:
        return _dry_run(parser, args, config)
    summary = run_rerank(config, args.input, args.output, stages=stages)
    line = {
        "model": summary["model"],
        **{k: summary[k] for k in ("input_rows", "scored_rows", "rejected_rows", "pairs_per_s")},
    }
    if summary["random_weights"]:
        line |= {
            "random_weights": True,
            "warning": f"RANDOM WEIGHTS: {summary['model']} has random weights; these scores mean nothing",
        }
    print(json.dumps(line))
    return 0


def _dry_run(parser, args, config: RerankConfig) -> int:
    from pipeline.rerank.capacity import ASSUMED_MFU
    from pipeline.rerank.dry_run import format_plan, plan_night, write_plan_json

    if not args.dry_run:
        parser.error("--dry-run-json, --gpus and --deadline-hours plan a run: add --dry-run")
    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    except ValueError:
        parser.error(f"--gpus {args.gpus}: a comma-separated list of GPU counts, e.g. 1,2,4,8")
    if (
        gpus is not None
        and min(gpus) < 1
        or args.deadline_hours is not None
        and not 0 < args.deadline_hours < math.inf
    ):
        parser.error("--gpus counts and --deadline-hours must be positive")
    if args.sample_pairs < 1 or args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error("--sample-pairs must be at least 1, --mfu between 0 and 1")
    plan = plan_night(
        config,
        args.input,
        args.output,
        gpu_counts=gpus,
        deadline_hours=args.deadline_hours,
        sample_pairs=args.sample_pairs,
        mfu=args.mfu or ASSUMED_MFU,
    )
    print(format_plan(plan))
    if args.dry_run_json:
        write_plan_json(plan, args.dry_run_json)
    return 0


if __name__ == "__main__":
    run_main(main)
