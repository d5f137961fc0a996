"""python -m jobs.rerank --input URI --output URI --model NAME_OR_PATH [--dtype ...] [--config FILE] [--set k=v ...]

Scores every (query, document) pair of a Parquet table with a cross-encoder on Ray Data and writes the
pairs ranked per query, the rejected rows with their reasons, and summary.json (last) under --output.
"""

from __future__ import annotations

import json
from typing import Sequence

from pipeline.cli import base_parser, check_job_location, run_main, setup_logging
from pipeline.config import load_config
from pipeline.rerank_config import RerankConfig
from pipeline.rerank_job import run_rerank


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m jobs.rerank", " ".join(__doc__.split("\n\n")[1].split()), model_required=False)
    parser.epilog = ("Exit status: 0 done (or already complete); 2 bad input, config, checkpoint or output location; "
                     "3 infrastructure fault (storage unreachable, disk full): fix it and rerun to resume; "
                     "4 unexpected error (run with -v for the traceback). Every failure is one `error:` line.")
    parser.add_argument("--input", required=True, help="Parquet file, folder or glob: local path or s3://, gs://, file://")
    parser.add_argument("--output", required=True, help="output folder: local path or object-storage URI")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    check_job_location(args.output)
    config = load_config(RerankConfig, args.config, args.overrides, model=args.model, dtype=args.dtype)
    summary = run_rerank(config, args.input, args.output)
    line = {"model": summary["model"], **{k: summary[k] for k in ("input_rows", "scored_rows", "rejected_rows",
                                                                   "pairs_per_s")}}
    if summary["random_weights"]:
        line |= {"random_weights": True,
                 "warning": f"RANDOM WEIGHTS: {summary['model']} has random weights; these scores mean nothing"}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    run_main(main)
