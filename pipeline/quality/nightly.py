"""One night of index quality, end to end: read -> measure -> compare -> report -> record.

    run (+ qrels) --------------------> judged measures of the first-stage order      (overall)
    run + reranker scores ------------> label-free measures, reranker as judge        (judge/...)
    run + reranker scores + qrels ----> judged measures of the reranker's order       (reranked/...)
    tonight's per-query + history ----> deltas, paired test, alerts
    all of it ------------------------> metrics.json, per_query.parquet, report.html; then the history row

The measuring runs where the data lives (`parts.py`): the run is split by hash(query_id) into parts, each
part's per-query measures are computed on a Ray task, and only the per-query tables (queries x measures)
reach this process, for the means, the paired test and the report. `measure` computes the same tables from a
whole run in one process (for runs held in memory, and as the reference the parts are tested against).

Reranker scores come from a score column already in the run (`input.judge_score_column`, e.g. the rerank
job's output) or from the rerank job's ranked/ parts (`reranker_parts`, `--model`). Every measure is better
when higher.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import config_hash, redact
from pipeline.core.errors import InputError
from pipeline.core.schema import FIRST_STAGE_RANK, QUERY_ID, REASON, SCORE
from pipeline.core.storage import join, url_to_fs
from pipeline.core.trec import read_qrels
from pipeline.quality.compare import Comparison, compare_nights
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.history import NIGHT, History
from pipeline.quality.label_free import RERANKER_RANK, rank_both, score_summary
from pipeline.quality.metrics import means
from pipeline.quality.parts import (
    LABEL_FREE,
    LABELLED,
    RERANKED,
    Combined,
    RunPlan,
    judge_table,
    measure_families,
    measure_run,
    plan_run,
)
from pipeline.quality.report import NightReport, random_weights_warning, write_report
from pipeline.quality.run_input import no_usable_rows
from pipeline.quality.segments import segment_means

log = logging.getLogger(__name__)

REJECTED_PARQUET = "rejected.parquet"
GAIN_NOTE = (
    "judge/nDCG gains: sigmoid(reranker score) as the probability of relevance; ideal ranking = the "
    "reranker's order of the same candidates"
)


def _outer_join(tables: list[pa.Table]) -> pa.Table:
    joined = tables[0]
    for table in tables[1:]:
        joined = joined.join(table, keys=QUERY_ID, join_type="full outer")
    return joined.sort_by(QUERY_ID)


def _judge_table(
    run_pairs: pa.Table, reranker_scores: pa.Table | None
) -> tuple[pa.Table | None, int]:
    """(query_id, doc_id, first_stage_rank, score = the judge's) and how many run pairs lack a judge score."""
    return judge_table(run_pairs, reranker_scores)


@dataclass
class Measured:
    """Tonight's measures: per query (query_id, <measure>: float64 ...) and their means, by family."""

    per_query: pa.Table
    overall: dict[str, float] = field(default_factory=dict)  # judged, first-stage order
    reranked: dict[str, float] = field(
        default_factory=dict
    )  # judged, reranker's order (reranked/...)
    label_free: dict[str, float] = field(default_factory=dict)  # reranker as judge (judge/...)
    score_summary: dict | None = None
    judge_pairs: pa.Table | None = (
        None  # (first_stage_rank, reranker_rank, score) for the report's plots
    )

    @property
    def means(self) -> dict[str, float]:
        return {**self.overall, **self.reranked, **self.label_free}


def _measured(tables: dict[str, pa.Table]) -> Measured:
    """Measured from the per-query tables of each family (LABELLED, LABEL_FREE, RERANKED), sorted by query."""
    parts, result = [], Measured(per_query=pa.table({}))
    if LABELLED in tables:
        result.overall = means(tables[LABELLED])
        parts.append(tables[LABELLED])
    if LABEL_FREE in tables:
        result.label_free = means(tables[LABEL_FREE])
        parts.append(tables[LABEL_FREE])
    if RERANKED in tables:
        result.reranked = means(tables[RERANKED])
        parts.append(tables[RERANKED])
    result.per_query = (
        _outer_join(parts) if parts else pa.table({QUERY_ID: pa.array([], pa.string())})
    )
    return result


def measure(
    config: IndexQualityConfig, pairs: pa.Table, qrels: pa.Table | None, judge: pa.Table | None
) -> Measured:
    """Every measure the inputs allow, from a whole run in this process. pairs: load_run's; judge: (query_id,
    doc_id, first_stage_rank, score)."""
    result = _measured(measure_families(config, pairs, qrels, judge))
    if judge is not None:
        result.score_summary = score_summary(judge[SCORE])
        result.judge_pairs = rank_both(judge).select([FIRST_STAGE_RANK, RERANKER_RANK, SCORE])
    return result


def _combined_score_summary(combined: Combined) -> dict | None:
    """score_summary of every judge score when the plot sample holds them all; otherwise exact count, mean,
    std, min and max from the buckets' sums, with the quantiles of the sample."""
    moments = combined.score_moments
    if moments is None:
        return None
    sample = combined.judge_pairs
    if sample is not None and sample.num_rows == moments["count"]:
        return score_summary(sample[SCORE])
    summary = score_summary(sample[SCORE]) if sample is not None and sample.num_rows else {}
    count = moments["count"]
    mean = moments["sum"] / count
    std = math.sqrt(max(0.0, moments["sum_sq"] / count - mean * mean))
    return {
        **summary,
        "count": int(count),
        "mean": mean,
        "std": std,
        "min": moments["min"],
        "max": moments["max"],
        "quantiles_from_pairs": 0 if sample is None else sample.num_rows,
    }


def measure_in_parts(
    config: IndexQualityConfig,
    plan: RunPlan,
    output: str,
    qrels: pa.Table | None,
    reranker_parts: list[str] | None,
) -> tuple[Measured, Combined]:
    """Measure the run part by part (`parts.py`); this process receives queries x measures only."""
    combined = measure_run(config, plan, output, qrels, reranker_parts)
    if combined.pairs == 0:
        raise no_usable_rows(
            plan.uri,
            combined.rejected
            if combined.rejected is not None
            else pa.table({REASON: pa.array([], pa.string())}),
        )
    qrels_queries = None if qrels is None else pc.unique(qrels[QUERY_ID].cast(pa.string()))
    if (
        qrels is not None
        and not pc.any(pc.is_in(combined.segments[QUERY_ID], qrels_queries)).as_py()
    ):
        raise InputError(
            f"no query of the run has judgements in the qrels (run query ids like "
            f"{combined.segments[QUERY_ID][:3].to_pylist()}, qrels query ids like "
            f"{qrels_queries[:3].to_pylist()}); check that both use the same query ids"
        )
    result = _measured(combined.tables)
    result.score_summary = _combined_score_summary(combined)
    result.judge_pairs = combined.judge_pairs
    return result, combined


def compare_with_previous(
    config: IndexQualityConfig, store: History | None, night: str, per_query: pa.Table
) -> tuple[str | None, list[Comparison], dict, pa.Table | None]:
    """(previous night, comparisons, its segment means, its per-query table) from the history; empty without one."""
    previous_night = store.previous_night(night) if store else None
    previous = store.read_per_query(previous_night) if previous_night else None
    if previous is None:
        return previous_night, [], {}, None
    a = config.alerts
    comparisons = compare_nights(
        per_query, previous, a.max_drop, a.default_max_drop, a.alpha, a.permutations, a.seed
    )
    kept = [c for c in config.segment_columns if c in previous.column_names]
    previous_segments = {}
    if kept:
        measures_only = previous.drop_columns(
            [c for c in config.segment_columns if c in previous.column_names]
        )
        previous_segments = segment_means(measures_only, previous.select([QUERY_ID, *kept]), kept)
    return previous_night, comparisons, previous_segments, previous


def _report_measures(
    config: IndexQualityConfig, measured: list[str]
) -> tuple[list[str], str | None]:
    """(trend measures, segment measure) for the plots: the configured ones, else the first measures."""
    report = config.report
    for name in [
        *report.trend_measures,
        *([report.segment_measure] if report.segment_measure else []),
    ]:
        if name not in measured:
            log.warning(
                "report measure %r was not measured tonight (measured: %s); using the defaults",
                name,
                measured,
            )
    trend = [t for t in report.trend_measures if t in measured] or measured[:2]
    segment = (
        report.segment_measure
        if report.segment_measure in measured
        else (measured[0] if measured else None)
    )
    return trend, segment


def evaluate_night(
    config: IndexQualityConfig,
    run: str,
    output: str,
    qrels: str | None = None,
    history: str | None = None,
    reranker_parts: list[str] | None = None,
    reranker: dict | None = None,
) -> NightReport:
    """Measure tonight's run, compare with the previous night in `history`, write the report and the history row.

    reranker_parts: the rerank job's ranked/ part files (query_id, doc_id, score), or None. reranker: that
    rerank's model and whether its weights are random ({"model": ..., "random_weights": ...}), for the report.
    Returns the NightReport (its `alerts` are the lines the job prints; `parts` says where each part was measured).
    """
    options = config.storage_options
    night = config.night_or_today()
    plan = plan_run(config, run)
    qrels_table = read_qrels(qrels, options) if qrels else None
    _check_something_to_measure(config, qrels_table, reranker_parts)
    log.info(
        "run %s: %s file(s), about %s pairs, measured in %d part(s) by hash of query_id, first-stage order "
        "from `%s`",
        run,
        len(plan.files),
        f"{plan.estimated_rows:,}",
        plan.num_buckets,
        plan.order,
    )
    measured, combined = measure_in_parts(config, plan, output, qrels_table, reranker_parts)
    segments = combined.segments
    log.info(
        "run %s: %d pairs over %d queries (%d rows rejected)",
        run,
        combined.pairs,
        segments.num_rows,
        _rejected_rows(combined),
    )

    store = History(history, options) if history else None
    previous_night, comparisons, previous_segments, previous_per_query = compare_with_previous(
        config, store, night, measured.per_query
    )
    per_query = measured.per_query.join(segments, keys=QUERY_ID, join_type="left outer").sort_by(
        QUERY_ID
    )
    judged = reranker_parts is not None or bool(config.input.judge_score_column)
    facts = _run_facts(config, plan, measured, combined, qrels, history, judged, reranker)
    row = _history_row(night, run, measured, facts)
    trend_measures, segment_measure = _report_measures(config, list(measured.means))
    report = NightReport(
        night=night,
        run=run,
        overall=measured.overall,
        per_query=per_query,
        reranked=measured.reranked,
        label_free=measured.label_free,
        score_summary=measured.score_summary,
        segments=segment_means(measured.per_query, segments, config.segment_columns),
        previous_segments=previous_segments,
        previous_night=previous_night,
        comparisons=comparisons,
        alerts=[c.alert_line() for c in comparisons if c.alert],
        history=store.with_row(row) if store else None,
        judge_pairs=measured.judge_pairs,
        extra=facts,
        trend_measures=trend_measures,
        segment_measure=segment_measure,
        previous_per_query=previous_per_query,
        parts=combined.buckets,
    )
    write_report(report, output, options)
    if _rejected_rows(combined):
        fs, root = url_to_fs(output, options)
        pq.write_table(combined.rejected, join(root, REJECTED_PARQUET), filesystem=fs)
    if store:
        store.append(row, per_query)
    return report


def _check_something_to_measure(
    config: IndexQualityConfig, qrels: pa.Table | None, reranker_parts: list[str] | None
) -> None:
    """Judgements, reranker parts or a judge score column: without any of them a night measures nothing."""
    if qrels is None and reranker_parts is None and not config.input.judge_score_column:
        raise InputError(
            "nothing to measure: pass --qrels for judged measures, and/or --model (or a run carrying "
            "reranker scores with `--set input.judge_score_column=<column>`) for label-free measures"
        )


def _rejected_rows(combined: Combined) -> int:
    return 0 if combined.rejected is None else combined.rejected.num_rows


def _run_facts(
    config: IndexQualityConfig,
    plan: RunPlan,
    measured: Measured,
    combined: Combined,
    qrels: str | None,
    history: str | None,
    judged: bool,
    reranker: dict | None,
) -> dict:
    """The night's facts for metrics.json and the report: inputs, counts, the reranker, the config.

    judged: a reranker scored the run (the rerank job's parts, or a judge score column in the run).
    """
    random_weights = bool(reranker and reranker["random_weights"])
    return {
        "qrels": qrels,
        "history": history,
        "num_queries": combined.segments.num_rows,
        "num_pairs": combined.pairs,
        "num_evaluated_queries": measured.per_query.num_rows,
        "rejected_rows": _rejected_rows(combined),
        "pairs_without_reranker_score": combined.unjudged_pairs if judged else None,
        "first_stage_order_column": plan.order,
        "relevance_level": config.metrics.relevance_level,
        "complete_queries": config.metrics.complete_queries,
        "label_free_gains": GAIN_NOTE if judged else None,
        "num_parts": plan.num_buckets,
        "reranker_model": None if reranker is None else reranker["model"],
        "reranker_random_weights": None if reranker is None else bool(reranker["random_weights"]),
        "warning": random_weights_warning(reranker["model"]) if random_weights else None,
        "config_hash": config_hash(config),
        "config": redact(config.model_dump(mode="json")),
    }


def _history_row(night: str, run: str, measured: Measured, facts: dict) -> dict:
    """Tonight's row of the history: when and what was measured, and every measure's mean."""
    return {
        NIGHT: night,
        "written_at": dt.datetime.now(dt.timezone.utc),
        "run": run,
        "num_queries": facts["num_queries"],
        "config_hash": facts["config_hash"],
        **measured.means,
    }
