"""Settings of the nightly index-quality job (`configs/index_quality.yaml`, `--set key=value`)."""

from __future__ import annotations

import datetime as dt

from pydantic import Field, field_validator

from pipeline.core.config import StrictModel
from pipeline.core.errors import InputError
from pipeline.quality.metrics import parse_measure
from pipeline.rerank.config import RerankConfig, validate_rerank_step


class InputConfig(StrictModel):
    # The run's first-stage order. Default: the first of first_stage_score, first_stage_rank, score, rank.
    score_column: str | None = None  # higher = better
    rank_column: str | None = None  # lower = better (used when score_column is not set)
    # A reranker score already in the run (for example the rerank job's output): label-free measures use it.
    judge_score_column: str | None = None


class MetricsConfig(StrictModel):
    # Measures with judgements, ir_measures notation: nDCG@k nDCG RR RR@k R@k P@k AP AP@k Success@k Rprec Judged@k.
    measures: list[str] = Field(
        default_factory=lambda: ["nDCG@10", "RR@10", "R@100", "P@10", "AP", "Judged@10"]
    )
    relevance_level: int = Field(
        1, ge=0
    )  # trec_eval -l: label >= this is relevant for binary measures
    complete_queries: bool = False  # trec_eval -c: qrels queries missing from the run count as 0

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, measures: list[str]) -> list[str]:
        try:
            return [str(parse_measure(m)) for m in measures]
        except InputError as e:
            raise ValueError(str(e)) from None


class LabelFreeConfig(StrictModel):
    cutoffs: list[int] = Field(default_factory=lambda: [10])  # judge/nDCG@k and judge/Overlap@k
    rbo_p: float = Field(0.9, gt=0.0, lt=1.0)  # RBO persistence: 0.9 weighs ~the top 10 most
    rbo_depth: int = Field(100, ge=1)
    # (m, k) pairs: share of the judge's top m that the retriever's top k holds.
    held: list[tuple[int, int]] = Field(default_factory=lambda: [(10, 50)])
    score_is_logit: bool = (
        True  # gains = sigmoid(score); false: scores are already probabilities in [0, 1]
    )


class AlertsConfig(StrictModel):
    # Largest tolerated drop of a measure's mean (absolute) before it can alert; per measure, else the default.
    max_drop: dict[str, float] = Field(default_factory=dict)
    default_max_drop: float | None = Field(
        0.01, ge=0.0
    )  # null: only measures in max_drop can alert
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # significance level of the paired test
    permutations: int = Field(10_000, ge=100)  # random sign flips (exact test when 2^n is fewer)
    seed: int = 0


class ReportConfig(StrictModel):
    trend_measures: list[str] = Field(
        default_factory=list
    )  # default: the first two measures of the night
    segment_measure: str | None = None  # default: the first measure of the night


class WorkersConfig(StrictModel):
    # The run is split by hash(query_id) into parts of about this many pairs; each part's per-query measures are
    # computed on a Ray task, and only the per-query table reaches the driver. A run of one part is measured in
    # the job's own process unless Ray is already running (with --model).
    rows_per_bucket: int = Field(1_000_000, ge=1)
    num_cpus: float = Field(1.0, gt=0.0)  # per task
    max_in_flight: int = Field(
        8, ge=1
    )  # tasks submitted at once (bounds the results waiting on the driver)
    # Pairs of (first-stage rank, reranker rank, score) kept for the report's plots, drawn by a hash of the pair
    # when there are more (the score summary's quantiles come from them then; count, mean, std, min, max are exact).
    plot_sample_pairs: int = Field(200_000, ge=1)


class IndexQualityConfig(StrictModel):
    night: dt.date | None = None  # the night this run belongs to; default: today (UTC)
    segment_columns: list[str] = Field(
        default_factory=list
    )  # query-level columns of the run to split by
    storage_options: dict = Field(
        default_factory=dict
    )  # fsspec options for s3:// etc. (never logged)
    input: InputConfig = Field(default_factory=InputConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    label_free: LabelFreeConfig = Field(default_factory=LabelFreeConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    # The rerank job's settings for `--model` runs, used as they are (--model and --dtype set rerank.model
    # and rerank.dtype): the same keys, defaults and checks as configs/rerank_*.yaml.
    rerank: RerankConfig = Field(default_factory=RerankConfig)

    @field_validator("rerank")
    @classmethod
    def _rerank_scores_every_candidate(cls, rerank: RerankConfig) -> RerankConfig:
        return validate_rerank_step(
            rerank,
            "the label-free measures need every candidate's score (an unscored pair counts as "
            "unjudged)",
        )

    def rerank_config(self) -> RerankConfig:
        """The rerank step's settings, with this job's storage options."""
        return self.rerank.model_copy(update={"storage_options": self.storage_options})

    def night_or_today(self) -> str:
        return (self.night or dt.datetime.now(dt.timezone.utc).date()).isoformat()
