"""One night of index quality, end to end: read -> measure -> compare -> report -> record.

    run (+ qrels) --------------------> judged measures of the first-stage order      (overall)
    run + reranker scores ------------> label-free measures, reranker as judge        (judge/...)
    run + reranker scores + qrels ----> judged measures of the reranker's order       (reranked/...)
    tonight's per-query + history ----> deltas, paired test, alerts
    all of it ------------------------> metrics.json, per_query.parquet, report.html; then the history row

Reranker scores come from a score column already in the run (`input.judge_score_column`, e.g. the rerank
job's output) or from the caller (`reranker_scores`, for the rerank pipeline run on the fly once the job
offers `--model`). Every measure is better when higher.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import config_hash, redact
from pipeline.errors import InputError
from pipeline.quality.compare import Comparison, compare_nights
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.history import NIGHT, History
from pipeline.quality.label_free import RERANKER_RANK, label_free_measures, rank_both, score_summary
from pipeline.quality.metrics import evaluate, means
from pipeline.quality.report import RERANKED_PREFIX, NightReport, write_report
from pipeline.quality.run_input import JUDGE_SCORE, load_run
from pipeline.quality.segments import query_segments, segment_means
from pipeline.schema import DOC_ID, FIRST_STAGE_RANK, QUERY_ID, SCORE
from pipeline.storage import join, url_to_fs
from pipeline.trec import read_qrels

log = logging.getLogger(__name__)

REJECTED_PARQUET = "rejected.parquet"
GAIN_NOTE = ("judge/nDCG gains: sigmoid(reranker score) as the probability of relevance; ideal ranking = the "
             "reranker's order of the same candidates")


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    return table.rename_columns([c if c == QUERY_ID else prefix + c for c in table.column_names])


def _outer_join(tables: list[pa.Table]) -> pa.Table:
    joined = tables[0]
    for table in tables[1:]:
        joined = joined.join(table, keys=QUERY_ID, join_type="full outer")
    return joined.sort_by(QUERY_ID)


def _judge_table(run_pairs: pa.Table, reranker_scores: pa.Table | None) -> tuple[pa.Table | None, int]:
    """(query_id, doc_id, first_stage_rank, score = the judge's) and how many run pairs lack a judge score."""
    if reranker_scores is not None:
        scores = reranker_scores.select([QUERY_ID, DOC_ID, SCORE]).cast(
            pa.schema([(QUERY_ID, pa.string()), (DOC_ID, pa.string()), (SCORE, pa.float64())]))
        table = run_pairs.select([QUERY_ID, DOC_ID, FIRST_STAGE_RANK]).join(scores, keys=[QUERY_ID, DOC_ID])
    elif JUDGE_SCORE in run_pairs.column_names:
        table = run_pairs.select([QUERY_ID, DOC_ID, FIRST_STAGE_RANK, JUDGE_SCORE]).rename_columns(
            [QUERY_ID, DOC_ID, FIRST_STAGE_RANK, SCORE])
    else:
        return None, 0
    table = table.filter(pc.invert(pc.is_nan(pc.fill_null(table[SCORE], float("nan")))))
    return table, run_pairs.num_rows - table.num_rows


@dataclass
class Measured:
    """Tonight's measures: per query (query_id, <measure>: float64 ...) and their means, by family."""

    per_query: pa.Table
    overall: dict[str, float] = field(default_factory=dict)     # judged, first-stage order
    reranked: dict[str, float] = field(default_factory=dict)    # judged, reranker's order (reranked/...)
    label_free: dict[str, float] = field(default_factory=dict)  # reranker as judge (judge/...)
    score_summary: dict | None = None
    judge_pairs: pa.Table | None = None  # (first_stage_rank, reranker_rank, score) for the report's plots

    @property
    def means(self) -> dict[str, float]:
        return {**self.overall, **self.reranked, **self.label_free}


def measure(config: IndexQualityConfig, pairs: pa.Table, qrels: pa.Table | None, judge: pa.Table | None) -> Measured:
    """Every measure the inputs allow. pairs: load_run's; judge: (query_id, doc_id, first_stage_rank, score)."""
    m, lf = config.metrics, config.label_free
    parts, result = [], Measured(per_query=pa.table({}))
    if qrels is not None:
        labelled = evaluate(pairs, qrels, m.measures, m.relevance_level, m.complete_queries)
        result.overall = means(labelled)
        parts.append(labelled)
    if judge is not None:
        judged = label_free_measures(judge, lf.cutoffs, lf.rbo_p, lf.rbo_depth, lf.held, lf.score_is_logit)
        result.label_free = means(judged)
        parts.append(judged)
        result.score_summary = score_summary(judge[SCORE])
        result.judge_pairs = rank_both(judge).select([FIRST_STAGE_RANK, RERANKER_RANK, SCORE])
        if qrels is not None:  # "what reranking would add": the same judged measures on the reranker's order
            by_reranker = _prefixed(evaluate(judge, qrels, m.measures, m.relevance_level, m.complete_queries),
                                    RERANKED_PREFIX)
            result.reranked = means(by_reranker)
            parts.append(by_reranker)
    result.per_query = _outer_join(parts)
    return result


def compare_with_previous(
    config: IndexQualityConfig, store: History | None, night: str, per_query: pa.Table
) -> tuple[str | None, list[Comparison], dict, pa.Table | None]:
    """(previous night, comparisons, its segment means, its per-query table) from the history; empty without one."""
    previous_night = store.previous_night(night) if store else None
    previous = store.read_per_query(previous_night) if previous_night else None
    if previous is None:
        return previous_night, [], {}, None
    a = config.alerts
    comparisons = compare_nights(per_query, previous, a.max_drop, a.default_max_drop, a.alpha, a.permutations, a.seed)
    kept = [c for c in config.segment_columns if c in previous.column_names]
    previous_segments = {}
    if kept:
        measures_only = previous.drop_columns([c for c in config.segment_columns if c in previous.column_names])
        previous_segments = segment_means(measures_only, previous.select([QUERY_ID, *kept]), kept)
    return previous_night, comparisons, previous_segments, previous


def _report_measures(config: IndexQualityConfig, measured: list[str]) -> tuple[list[str], str | None]:
    """(trend measures, segment measure) for the plots: the configured ones, else the first measures."""
    report = config.report
    for name in [*report.trend_measures, *([report.segment_measure] if report.segment_measure else [])]:
        if name not in measured:
            log.warning("report measure %r was not measured tonight (measured: %s); using the defaults", name, measured)
    trend = [t for t in report.trend_measures if t in measured] or measured[:2]
    segment = report.segment_measure if report.segment_measure in measured else (measured[0] if measured else None)
    return trend, segment


def evaluate_night(
    config: IndexQualityConfig,
    run: str,
    output: str,
    qrels: str | None = None,
    history: str | None = None,
    reranker_scores: pa.Table | None = None,
) -> NightReport:
    """Measure tonight's run, compare with the previous night in `history`, write the report and the history row.

    reranker_scores: (query_id, doc_id, score) from the rerank pipeline, or None. Returns the NightReport
    (its `alerts` are the lines the job prints).
    """
    options = config.storage_options
    night = config.night_or_today()
    loaded = load_run(run, options, config.input.score_column, config.input.rank_column,
                      config.input.judge_score_column, keep_columns=config.segment_columns)
    pairs = loaded.pairs
    segments = query_segments(pairs, config.segment_columns)
    log.info("run %s: %d pairs over %d queries (%d rows rejected), first-stage order from `%s`",
             run, pairs.num_rows, segments.num_rows, loaded.rejected.num_rows, loaded.order_column)
    qrels_table = read_qrels(qrels, options) if qrels else None
    judge, unjudged_pairs = _judge_table(pairs, reranker_scores)
    if qrels_table is None and judge is None:
        raise InputError("nothing to measure: pass --qrels for judged measures, and/or --model (or a run carrying "
                         "reranker scores with `--set input.judge_score_column=<column>`) for label-free measures")

    measured = measure(config, pairs, qrels_table, judge)
    store = History(history, options) if history else None
    previous_night, comparisons, previous_segments, previous_per_query = compare_with_previous(
        config, store, night, measured.per_query)
    per_query = measured.per_query.join(segments, keys=QUERY_ID, join_type="left outer").sort_by(QUERY_ID)

    facts = {
        "qrels": qrels,
        "history": history,
        "num_queries": segments.num_rows,
        "num_pairs": pairs.num_rows,
        "num_evaluated_queries": measured.per_query.num_rows,
        "rejected_rows": loaded.rejected.num_rows,
        "pairs_without_reranker_score": unjudged_pairs if judge is not None else None,
        "first_stage_order_column": loaded.order_column,
        "relevance_level": config.metrics.relevance_level,
        "complete_queries": config.metrics.complete_queries,
        "label_free_gains": GAIN_NOTE if judge is not None else None,
        "config_hash": config_hash(config),
        "config": redact(config.model_dump(mode="json")),
    }
    row = {NIGHT: night, "written_at": dt.datetime.now(dt.timezone.utc), "run": run,
           "num_queries": segments.num_rows, "config_hash": facts["config_hash"], **measured.means}
    trend_measures, segment_measure = _report_measures(config, list(measured.means))
    report = NightReport(
        night=night, run=run, overall=measured.overall, per_query=per_query, reranked=measured.reranked,
        label_free=measured.label_free, score_summary=measured.score_summary,
        segments=segment_means(measured.per_query, segments, config.segment_columns),
        previous_segments=previous_segments, previous_night=previous_night, comparisons=comparisons,
        alerts=[c.alert_line() for c in comparisons if c.alert],
        history=store.with_row(row) if store else None, judge_pairs=measured.judge_pairs, extra=facts,
        trend_measures=trend_measures, segment_measure=segment_measure, previous_per_query=previous_per_query,
    )
    write_report(report, output, options)
    if loaded.rejected.num_rows:
        fs, root = url_to_fs(output, options)
        pq.write_table(loaded.rejected, join(root, REJECTED_PARQUET), filesystem=fs)
    if store:
        store.append(row, per_query)
    return report
