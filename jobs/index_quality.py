"""Nightly index quality: judged and label-free measures, the trend over nights, alerts, a report.

    python -m jobs.index_quality --run URI --output URI [--qrels URI] [--model NAME_OR_PATH] [--history URI]
                                 [--config configs/index_quality.yaml] [--set key=value ...]

--run      first-stage results: a TREC run file (`qid Q0 docno rank score tag`) or the rerank job's Parquet
           input (long or grouped format, with first_stage_rank / first_stage_score, or rank / score)
--qrels    TREC qrels text or Parquet (query_id, doc_id, label), graded or binary
--model    rerank the run with the rerank job (into <output>/rerank/) for the label-free measures and
           "what reranking would add"; the run must then be the Parquet input with query and document texts
--texts    with --model and a TREC run file: a Parquet table (query_id, query, doc_id, document) holding the
           texts of the run's pairs; pairs without texts get no reranker score (counted in metrics.json)
--history  a folder (local or s3://) holding history.parquet and each night's per-query values;
           tonight's row is appended (a rerun of the same night replaces it)
--output   folder for metrics.json, per_query.parquet, report.html (and rejected.parquet if any row was)

Exit status: 0 = measured, no alert; 1 = at least one measure regressed beyond its threshold, significantly
(one `ALERT ...` line per measure on stdout); 2 = bad input or config (one `error: ...` line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import posixpath
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import base_parser, check_job_location, run_main, setup_logging
from pipeline.core.config import load_config
from pipeline.core.errors import InputError
from pipeline.core.schema import DOC_ID, DOCUMENT, QUERY, QUERY_ID, RANK, SCORE
from pipeline.core.storage import arrow_filesystem, join, url_to_fs
from pipeline.core.trec import is_parquet, read_run
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.nightly import evaluate_night
from pipeline.rerank.api import rerank

log = logging.getLogger("jobs.index_quality")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        "python -m jobs.index_quality",
        __doc__.split("\n\n")[0],
        model_required=False,
        set_example="rerank.scorer.max_tokens_per_batch=8192",
    )
    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--run", required=True, help="first-stage results: TREC run file or Parquet (see above)"
    )
    parser.add_argument("--output", required=True, help="output folder (local path or s3://...)")
    parser.add_argument(
        "--qrels", default=None, help="TREC qrels text or Parquet (query_id, doc_id, label)"
    )
    parser.add_argument("--history", default=None, help="history folder (local path or s3://...)")
    parser.add_argument(
        "--texts",
        default=None,
        help="with --model and a TREC run: Parquet of query_id, query, doc_id, document for its pairs",
    )
    return parser


def _write_run_with_texts(run_uri: str, texts_uri: str, target: str, options: dict) -> None:
    """A TREC run joined with its texts, written as the rerank job's long-format input."""
    run = read_run(run_uri, options).select([QUERY_ID, DOC_ID, RANK, SCORE])
    fs, path = url_to_fs(texts_uri, options)
    try:
        texts = pq.read_table(
            path, filesystem=arrow_filesystem(fs), columns=[QUERY_ID, QUERY, DOC_ID, DOCUMENT]
        )
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise InputError(
            f"--texts {texts_uri!r} must be Parquet with query_id, query, doc_id, document "
            f"({str(e).splitlines()[0]})"
        ) from None
    texts = pa.table(
        {
            QUERY_ID: texts[QUERY_ID].cast(pa.string()),
            QUERY: texts[QUERY],
            DOC_ID: texts[DOC_ID].cast(pa.string()),
            DOCUMENT: texts[DOCUMENT],
        }
    )
    joined = run.join(texts, keys=[QUERY_ID, DOC_ID], join_type="inner")
    if joined.num_rows == 0:
        raise InputError(
            f"--texts {texts_uri!r} holds no text for any (query_id, doc_id) of the run"
        )
    out_fs, out_path = url_to_fs(target, options)
    out_fs.makedirs(posixpath.dirname(out_path), exist_ok=True)
    with out_fs.open(out_path, "wb") as f:
        pq.write_table(joined, f)


def rerank_parts(args: argparse.Namespace, config: IndexQualityConfig) -> tuple[list[str], dict]:
    """Rerank the run through the rerank job: (the ranked/ part files (whole queries each), which the measuring
    tasks read (only query_id, doc_id and score), so no score or text reaches this process; the rerank's model
    and whether its weights are random)."""
    options = config.storage_options
    rerank_input = args.run
    if not is_parquet(args.run, options):
        if not args.texts:
            raise InputError(
                "--model needs texts: pass the run as the rerank job's Parquet input, or add "
                "--texts with a Parquet table of query_id, query, doc_id, document"
            )
        rerank_input = join(args.output, "rerank_input.parquet")
        _write_run_with_texts(args.run, args.texts, rerank_input, options)
    result = rerank(config.rerank_config(), rerank_input, join(args.output, "rerank"))
    return result.parts(), {k: result.summary[k] for k in ("model", "random_weights")}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_job_location(args.output)
    check_job_location(args.history, "--history")
    config = load_config(
        IndexQualityConfig,
        args.config,
        args.overrides,
        rerank__model=args.model,
        rerank__dtype=args.dtype,
    )
    parts, reranker = rerank_parts(args, config) if args.model else (None, None)
    report = evaluate_night(
        config,
        run=args.run,
        output=args.output,
        qrels=args.qrels,
        history=args.history,
        reranker_parts=parts,
        reranker=reranker,
    )
    if report.extra.get("warning"):
        log.warning("%s", report.extra["warning"])
    for name, value in report.all_means().items():
        log.info("%-28s %.4f", name, value)
    log.info("report: %s", join(args.output, "report.html"))
    for line in report.alerts:
        print(line)
    return 1 if report.alerts else 0


if __name__ == "__main__":
    run_main(main)
