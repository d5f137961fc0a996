"""Settings of the benchmark job (`python -m jobs.benchmark`, `--set key=value`)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.benchmark.checkpoints import REAL_CHECKPOINT_ENV
from pipeline.benchmark.contenders import CONTENDERS
from pipeline.core.config import StrictModel
from pipeline.datasets import WORKLOADS
from pipeline.model.dummy import ARCHITECTURES

# What users run today, and our engine in process and as the whole job: on every model and workload.
CORE_CONTENDERS = ["st-default", "st-best", "hf-padded", "hf-sorted", "engine", "ray-job"]
# The CPU runtimes users pick for fast reranking (sentence-transformers' `onnx` / `openvino` backends).
CPU_RUNTIME_CONTENDERS = ["ort-fp32", "ort-int8", "ov-fp32", "ov-default", "ov-int8"]
DEFAULT_CONTENDERS = [*CORE_CONTENDERS, "engine-fp32", "engine-int8", *CPU_RUNTIME_CONTENDERS]


class Scope(StrictModel):
    """Where one contender runs among a run's models and workloads."""

    workloads: list[str] | None = (
        None  # on the first of `models` (or RERANKER_CHECKPOINT); None: all of them
    )
    other_models: list[str] | None = (
        None  # on each other model: these workloads; None: as on the first; []: none
    )


# The default run's plan: every contender on the jina shape's DL19 pairs; sentence-transformers (its default,
# the fidelity reference, and its best) and the engine also on long and multilingual pairs; the bge shape (the
# release post's size claim) with those three on DL19. Why: the full matrix (13 contenders x 2 models x 3 workloads)
# would take ~40 minutes on 2 cores, this plan about a third of it (the measured minutes per part:
# results/performance.md, "Figures behind choices in the benchmark's code").
# An explicit --models, --workloads or --contenders runs exactly that selection, everything on everything.
DEFAULT_SCOPE: dict[str, dict] = {
    **{name: {"other_models": ["dl19"]} for name in ["st-default", "st-best", "engine"]},
    **{
        name: {"workloads": ["dl19"], "other_models": []}
        for name in [
            "hf-padded",
            "hf-sorted",
            "ray-job",
            "engine-fp32",
            "engine-int8",
            *CPU_RUNTIME_CONTENDERS,
        ]
    },
}


class BenchmarkConfig(StrictModel):
    workloads: list[str] = Field(default_factory=lambda: ["dl19", "long", "multilingual"])
    models: list[str] = Field(
        default_factory=lambda: ["jina-reranker-v2-base", "bge-reranker-v2-m3"]
    )
    contenders: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTENDERS))
    # Contenders limited to the first model and/or some workloads (unlisted ones run everywhere). Left unset:
    # DEFAULT_SCOPE when models, workloads and contenders are the defaults, no limits otherwise.
    contender_scope: dict[str, Scope] = Field(default_factory=dict)
    # Pairs per workload for the jina-sized model (the first n of each workload, so every contender scores
    # the same pairs). The default run took ~14 minutes with them on a 2-core Xeon VM (see DEFAULT_SCOPE);
    # bigger runs: --n-pairs.
    n_pairs: dict[str, int] = Field(
        default_factory=lambda: {"dl19": 256, "long": 24, "multilingual": 256}
    )
    # float32 contenders (st-default, engine-fp32) are ~5x slower on a bf16 CPU. With a fraction < 1 they
    # score only the first part of the pairs (throughput measured on fewer pairs, never extrapolated; the
    # JSON records how many), but then sentence-transformers sorts fewer pairs and pads more than it would
    # on all of them, which flatters the engine: the default is every pair.
    full_precision_pairs_fraction: float = Field(1.0, gt=0.0, le=1.0)
    # Models bigger than jina's base get fewer pairs, in proportion to their FLOPs per token (bge-m3: ~3.5x).
    scale_pairs_by_model_size: bool = True
    max_length: int = Field(1024, ge=8)
    # Pieces of the tokenizer trained on the workloads' text (see checkpoints.py; tests use a small one).
    tokenizer_vocab: int = Field(32000, ge=300)
    device: str = "cpu"
    # hf-padded / hf-sorted / st-default: pairs per batch (sentence-transformers' and most scripts' default).
    batch_size: int = Field(32, ge=1)
    # st-best: batch sizes tried on the first `tune_pairs` pairs of each workload (at most a quarter of
    # them); the fastest is then timed on all of them.
    # Measured (2-core CPU, bf16): 4 won on DL19 for both models and 4-8 on XQuAD-R; 32 and 64 never did.
    tune_batch_sizes: list[int] = Field(default_factory=lambda: [2, 4, 8, 16])
    tune_pairs: int = Field(32, ge=1)
    # ov-int8: pairs per workload its static quantization is calibrated on (the ones right after the timed
    # pairs; sentence-transformers' helper uses 300 SST-2 sentences, which took ~12 minutes on 2 cores).
    calibration_pairs: int = Field(32, ge=1)
    warmup_pairs: int = Field(8, ge=1)
    # Our engine's token budget per micro-batch; null: its device default (DEFAULT_MAX_TOKENS).
    max_tokens_per_batch: int | None = Field(None, ge=1)
    # `--set` overrides for the ray-job contender (the job's own defaults otherwise), e.g. scorer.torch_threads=2.
    ray_job_overrides: list[str] = Field(default_factory=list)
    # Sweeps over the contenders; each row reports its fastest sweep and every sweep's pairs/s (runner.py says
    # why sweeps). 1 on a quiet machine; 2-3 on a shared VM, where the figures drift over minutes.
    rounds: int = Field(1, ge=1)
    # Seconds each GEMM shape is timed for the peak FLOP/s (measured before and after the contenders).
    peak_seconds_per_shape: float = Field(0.5, gt=0.0)
    # Per worker process (one contender, one model, every workload); a worker past it is an error.
    worker_timeout_s: float = Field(1800.0, gt=0.0)
    data_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_plan(cls, data: Any) -> Any:
        """The default run's scope when the run is the default selection (before validation: the fields are
        assigned on validation, so the check sees what the user gave)."""
        if isinstance(data, dict) and "contender_scope" not in data:
            defaults = ("models", "workloads", "contenders")
            if not any(key in data for key in defaults):
                data = {**data, "contender_scope": DEFAULT_SCOPE}
        return data

    @model_validator(mode="after")
    def _scope_fits_the_run(self) -> BenchmarkConfig:
        for name, scope in self.contender_scope.items():
            _known([name], CONTENDERS, "contender in contender_scope")
            for key in ("workloads", "other_models"):
                if getattr(scope, key):
                    _known(
                        getattr(scope, key), WORKLOADS, f"workload in contender_scope.{name}.{key}"
                    )
        # A real checkpoint (RERANKER_CHECKPOINT) replaces the models: the run has one, the first.
        firsts = (
            [True, False]
            if len(self.models) > 1 and not os.environ.get(REAL_CHECKPOINT_ENV)
            else [True]
        )
        plans = [self.plan(first) for first in firsts]
        for name in self.contenders:
            if not any(name in plan for plan in plans):
                raise ValueError(
                    f"contender_scope.{name} leaves it none of this run's workloads ({self.workloads}) "
                    f"on any of its models; widen the scope or drop {name}"
                )
        for first, plan in zip(firsts, plans):
            if not plan:
                which = "the first model" if first else "the models after the first"
                raise ValueError(
                    f"contender_scope leaves no contender on {which} of {self.models}; "
                    "widen a contender's scope or drop the model"
                )
        return self

    def scope(self, contender: str) -> Scope:
        return self.contender_scope.get(contender) or Scope()

    def plan(self, first_model: bool) -> dict[str, list[str]]:
        """contender -> the workloads it scores on the first model or on each other one (in the run's order);
        contenders left with none are not in it. The fidelity reference is added by the runner."""
        plan = {}
        for name in self.contenders:
            scope = self.scope(name)
            allowed = (
                scope.workloads if first_model or scope.other_models is None else scope.other_models
            )
            workloads = [w for w in self.workloads if allowed is None or w in allowed]
            if workloads:
                plan[name] = workloads
        return plan

    @field_validator("workloads")
    @classmethod
    def _known_workloads(cls, names: list[str]) -> list[str]:
        return _known(names, WORKLOADS, "workload")

    @field_validator("models")
    @classmethod
    def _known_models(cls, names: list[str]) -> list[str]:
        names = _known(names, ARCHITECTURES, "model")
        # The libraries are given a decoder's prompt as two texts (workloads.prompt_pairs), which reproduces the
        # engine's tokens only for a template tokenized whole; Gemma's is tokenized in pieces, as FlagEmbedding
        # does. Refused here, before minutes of building its checkpoint.
        pieced = [n for n in names if _dummy_template_pieced(ARCHITECTURES[n].layout)]
        if pieced:
            raise ValueError(
                f"{pieced} cannot be benchmarked against the libraries yet: its prompt is tokenized in "
                "pieces, which the libraries' text inputs cannot reproduce; score it with the engine "
                "(pipeline.model.CrossEncoder) or the rerank job instead"
            )
        return names

    @field_validator("contenders")
    @classmethod
    def _known_contenders(cls, names: list[str]) -> list[str]:
        return _known(names, CONTENDERS, "contender")


def _dummy_template_pieced(layout: str) -> bool:
    """Whether the prompt template a dummy checkpoint of `layout` names is tokenized in pieces (False for a
    cross-encoder)."""
    from pipeline.model.decoder_dummy import FAMILIES
    from pipeline.model.templates import TEMPLATES

    return layout in FAMILIES and TEMPLATES[FAMILIES[layout][1]].pieced


def _known(names: list[str], known, what: str) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or names}; choose from {sorted(known)}")
    return names
