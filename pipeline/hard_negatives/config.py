"""Settings of hard-negative mining, each default with where it comes from.

References pinned here, so a reader can check every number:
- NV-Retriever (Moreira et al. 2024, arXiv:2407.15831), "TopK-PercPos": drop candidates scoring above 95% of
  the positive's score, then take the top k -> `relative_margin = 0.05`, `sampling = "top"`.
- sentence-transformers 6.2 `sentence_transformers.util.mine_hard_negatives`: the names and meanings of
  `relative_margin`, `absolute_margin`, `max_score`, `min_score`, `range_min`, `range_max`, `num_negatives`
  (default 3) and `sampling_strategy` (default "top"); the margin is taken against the query's *lowest*
  positive score, and a candidate is removed when `score > threshold` (equality keeps it).
- RocketQA (Qu et al. 2021, arXiv:2010.08191), denoised hard negatives and pseudo-labels from a
  cross-encoder: confidence > 0.9 made a positive, < 0.1 a negative. On a raw logit those are
  logit(0.9) = ln 9 = 2.197 and logit(0.1) = -2.197; both are opt-in here (`pseudo_positive_min_score`,
  `max_score`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.config import StrictModel
from pipeline.rerank.config import RerankConfig, validate_rerank_step

Sampling = Literal["top", "random"]
Projection = Literal["triplet", "n-tuple", "flagembedding"]


class SelectionConfig(StrictModel):
    """Which candidates become negatives (see `pipeline.hard_negatives.select` for the order of the rules)."""

    # What counts as a positive in graded qrels (or in the input's `label` column): label >= this.
    # Default 1: trec_eval's binary relevance (label >= 1). TREC DL passage tasks use 2.
    min_positive_label: int = 1
    # A negative needs score <= pos_min - |pos_min| * relative_margin, pos_min = the query's lowest positive
    # score. 0.05 = NV-Retriever's TopK-PercPos (95%); None turns the rule off.
    relative_margin: float | None = Field(default=0.05, ge=0)
    # A negative needs score <= pos_min - absolute_margin (sentence-transformers; off by default there too).
    absolute_margin: float | None = Field(default=None, ge=0)
    # A negative needs score <= max_score / score >= min_score (sentence-transformers; off by default).
    max_score: float | None = None
    min_score: float | None = None
    # Window of first-stage ranks (1 = best) a negative may come from: range_min < rank <= range_max.
    # range_min = 10 skips the first stage's top 10, as sentence-transformers' range_min does; default 0 and
    # no upper bound, as there.
    range_min: int = Field(default=0, ge=0)
    range_max: int | None = Field(default=None, ge=1)
    # Negatives wanted per query, or per positive (`negatives_per = "positive"`: num_negatives x the query's
    # positives, each positive paired with its own). Default 3 and per query: sentence-transformers.
    num_negatives: int = Field(default=3, ge=1)
    negatives_per: Literal["query", "positive"] = "query"
    # "top": the hardest survivors (NV-Retriever's TopK, sentence-transformers' default); "random": survivors
    # ordered by sha256(seed, query_id, doc_id), the same sample on any machine.
    sampling: Sampling = "top"
    seed: int = 0
    # Near-duplicates of a positive are not negatives: Jaccard similarity of word n-gram sets >= this.
    # Off by default (exact duplicates under another id are always caught by the normalized-text hash).
    near_duplicate_threshold: float | None = Field(default=None, gt=0, le=1)
    near_duplicate_ngram: int = Field(default=3, ge=1)
    # Queries with no positive among their candidates are skipped; set this to promote the reranker's top
    # candidate to a pseudo-positive when its score is at least this (RocketQA; ln 9 = 2.197 is its 0.9).
    pseudo_positive_min_score: float | None = None

    @model_validator(mode="after")
    def _window_is_not_empty(self) -> SelectionConfig:
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must be greater than range_min ({self.range_min}): "
                "negatives come from first-stage ranks range_min < rank <= range_max"
            )
        return self

    def quota(self, num_positives: int) -> int:
        """How many negatives a query with `num_positives` positives should get."""
        return self.num_negatives * (num_positives if self.negatives_per == "positive" else 1)


class ProjectionsConfig(StrictModel):
    """The training files written beside the canonical table."""

    # triplet / n-tuple: sentence-transformers Parquet; flagembedding: FlagEmbedding's JSONL.
    formats: list[Projection] = Field(
        default_factory=lambda: ["triplet", "n-tuple", "flagembedding"]
    )
    # Score columns in the sentence-transformers files: "margin" adds `label` = positive score - negative
    # score (a float for triplets, a list for n-tuples), which MarginMSELoss reads; "scores" adds `scores` =
    # [positive, negative...] as mine_hard_negatives(output_scores=True) writes them; "none" adds nothing.
    scores: Literal["none", "margin", "scores"] = "none"


class WorkersConfig(StrictModel):
    """The Ray tasks that select per ranking bucket and then write the output parts: at most `num_actors`
    run at a time in each step (the name kept from when they were actor pools), `num_cpus` each."""

    num_actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, gt=0)  # per task


class OutputConfig(StrictModel):
    # Rows of the canonical table per output part (about: a part holds the queries hashed to it). The number
    # of parts comes from the scored rows alone, never from the rerank's buckets or the tasks, so the files
    # are the same bytes however the work was spread.
    rows_per_part: int = Field(default=1_000_000, ge=1)


class HardNegativesConfig(StrictModel):
    """The job's settings (`configs/hard_negatives.yaml` is the documented example)."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    projections: ProjectionsConfig = Field(default_factory=ProjectionsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # The rerank job's settings, used as they are (--model and --dtype set rerank.model and rerank.dtype).
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    # fsspec options for --input/--positives/--output URIs (credentials, endpoint_url); never logged.
    storage_options: dict = Field(default_factory=dict)

    @field_validator("rerank")
    @classmethod
    def _rerank_scores_every_candidate(cls, rerank: RerankConfig) -> RerankConfig:
        return validate_rerank_step(
            rerank,
            "every candidate needs its score (a positive ranked below k would go unseen); limit "
            "candidates with selection.range_max",
        )

    def result_settings(self) -> dict:
        """The settings that change what the job writes (in every file's metadata and stats.json's `run`):
        actor counts, batch sizes, how the rerank buckets its ranking and where the data lives change only
        speed, so they are left out and the files stay the same bytes however the work was spread."""
        settings = self.model_dump(mode="json", exclude={"workers", "rerank", "storage_options"})
        rerank = self.rerank_config().result_settings()
        rerank["output"].pop("rows_per_bucket")
        return {**settings, "rerank": rerank}

    def rerank_config(self) -> RerankConfig:
        """The rerank step's settings, with this job's storage options. Texts are carried to ranked/ (the
        projections and the duplicate-of-positive rule need them), so the input is read once, by the rerank."""
        return self.rerank.model_copy(
            update={
                "storage_options": self.storage_options,
                "output": self.rerank.output.model_copy(update={"carry_texts": True}),
            }
        )
