"""Nightly index quality: judged and label-free measures, the trend over nights, alerts, a report.

    python -m jobs.index_quality --run URI --output URI [--qrels URI] [--history URI]
                                 [--config configs/index_quality.yaml] [--set key=value ...]

--run      first-stage results: a TREC run file (`qid Q0 docno rank score tag`) or the rerank job's Parquet
           input (long or grouped format, with first_stage_rank / first_stage_score, or rank / score)
--qrels    TREC qrels text or Parquet (query_id, doc_id, label), graded or binary
--history  a folder (local or s3://) holding history.parquet and each night's per-query values;
           tonight's row is appended (a rerun of the same night replaces it)
--output   folder for metrics.json, per_query.parquet, report.html (and rejected.parquet if any row was)

Exit status: 0 = measured, no alert; 1 = at least one measure regressed beyond its threshold, significantly
(one `ALERT ...` line per measure on stdout); 2 = bad input or config (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.cli import base_parser, run_main, setup_logging
from pipeline.config import load_config
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.nightly import evaluate_night
from pipeline.storage import join

log = logging.getLogger("jobs.index_quality")


def _drop_options(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Remove options `base_parser` adds that this job does not offer (argparse has no public way)."""
    for action in [a for a in parser._actions if a.dest in dests]:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("index_quality", __doc__.split("\n\n")[0], model_required=False)
    # --model/--dtype (rerank the run for label-free measures) need the rerank pipeline's entry point,
    # pipeline.rerank_job.run_rerank, which does not exist yet: until then the job does not offer them, rather
    # than accept a model it would ignore. A run that already carries reranker scores gets the same measures
    # with `--set input.judge_score_column=<column>`.
    _drop_options(parser, "model", "dtype")
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("--run", required=True, help="first-stage results: TREC run file or Parquet (see above)")
    parser.add_argument("--output", required=True, help="output folder (local path or s3://...)")
    parser.add_argument("--qrels", default=None, help="TREC qrels text or Parquet (query_id, doc_id, label)")
    parser.add_argument("--history", default=None, help="history folder (local path or s3://...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config = load_config(IndexQualityConfig, args.config, args.overrides)
    report = evaluate_night(config, run=args.run, output=args.output, qrels=args.qrels, history=args.history)
    for name, value in report.all_means().items():
        log.info("%-28s %.4f", name, value)
    log.info("report: %s", join(args.output, "report.html"))
    for line in report.alerts:
        print(line)
    return 1 if report.alerts else 0


if __name__ == "__main__":
    run_main(main)
