"""One night's results in the shapes the report needs (`NightReport`), and its metrics.json.

The report's statistics are in `statistics.py`, its plots in `plots.py`, its HTML in `page.py`; `report.py`
writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa

from pipeline.quality.compare import Comparison
from pipeline.quality.statistics import (
    BOOTSTRAP_METHOD,
    CONFIDENCE,
    bootstrap_interval,
    measured_values,
)

RERANKED_PREFIX = "reranked/"  # judged measures of the reranker's order (parts.py names them)


def random_weights_warning(model: str) -> str:
    """The caveat of a report whose reranker has random weights (a `dummy:` model, for trying the pipeline)."""
    return (
        f"RANDOM WEIGHTS: the reranker {model} has random weights, so every measure after reranking and every "
        "measure with the reranker as judge is noise; rerank with a trained model to measure anything"
    )


@dataclass
class NightReport:
    """Everything one night produced, in the shapes the report needs."""

    night: str
    run: str
    overall: dict[str, float]  # labelled measures of the first-stage run
    per_query: pa.Table  # (query_id, <measure> ..., <segment column> ...)
    reranked: dict[str, float] = field(
        default_factory=dict
    )  # labelled measures of the reranker's order
    label_free: dict[str, float] = field(default_factory=dict)  # judge/... means
    score_summary: dict[str, float] | None = None
    segments: dict[str, dict] = field(default_factory=dict)  # segments.segment_means of tonight
    previous_segments: dict[str, dict] = field(default_factory=dict)  # ... of the previous night
    previous_night: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    history: pa.Table | None = None  # history table including tonight's row
    judge_pairs: pa.Table | None = None  # (first_stage_rank, reranker_rank, score) for the plots
    extra: dict = field(
        default_factory=dict
    )  # run facts for metrics.json (qrels, rows, rejected, config ...)
    parts: list = field(
        default_factory=list
    )  # where each part of the run was measured: bucket, pid, pairs, queries
    trend_measures: list[str] = field(default_factory=list)
    segment_measure: str | None = None
    previous_per_query: pa.Table | None = (
        None  # the previous night's (query_id, <measure> ...), for per-query change
    )

    def all_means(self) -> dict[str, float]:
        return {**self.overall, **self.reranked, **self.label_free}

    @cached_property
    def intervals(self) -> dict[str, tuple[float, float] | None]:
        """{measure: (low, high)} 95% bootstrap interval of tonight's mean; None below 2 queries."""
        return {m: bootstrap_interval(measured_values(self.per_query, m)) for m in self.all_means()}

    def metrics_json(self) -> dict:
        return {
            "night": self.night,
            "run": self.run,
            "overall": self.overall,
            "reranked": self.reranked,
            "label_free": {"measures": self.label_free, "score_summary": self.score_summary},
            "confidence_intervals": {
                "method": BOOTSTRAP_METHOD,
                "confidence": CONFIDENCE,
                "measures": {m: list(i) for m, i in self.intervals.items() if i is not None},
            },
            "segments": self.segments,
            "comparison": {
                "previous_night": self.previous_night,
                "test": "two-sided paired randomization (sign-flip) test over queries of the mean difference",
                "measures": [c.to_dict() for c in self.comparisons],
            },
            "alerts": self.alerts,
            **self.extra,
        }
