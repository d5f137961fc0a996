"""Settings of the benchmark job (`python -m jobs.benchmark`, `--set key=value`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.benchmark.contenders import CONTENDERS
from pipeline.config import StrictModel
from pipeline.datasets import WORKLOADS
from pipeline.model.dummy import ARCHITECTURES

DEFAULT_CONTENDERS = ["st-default", "st-best", "hf-padded", "hf-sorted", "engine", "ray-job"]
# The CPU runtimes users pick for fast reranking. Not in the default run: with batch-size tuning, the
# export and the int8 calibration they would add ~10 minutes per model on a 2-core CPU (estimated from
# their pairs/s on DL19 with the jina shape, measured 2026-11-30 on a 2-core AVX512-BF16 EPYC: ONNX Runtime
# fp32 8.5, OpenVINO f32 9.2, int8 26-34); run them with `--contenders engine,ort-fp32,ort-int8,ov-fp32,ov-default,ov-int8 --models jina-reranker-v2-base`.
CPU_RUNTIME_CONTENDERS = ["ort-fp32", "ort-int8", "ov-fp32", "ov-default", "ov-int8"]


class BenchmarkConfig(StrictModel):
    workloads: list[str] = Field(default_factory=lambda: ["dl19", "long", "multilingual"])
    models: list[str] = Field(default_factory=lambda: ["jina-reranker-v2-base", "bge-reranker-v2-m3"])
    contenders: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTENDERS))
    # Pairs per workload for the jina-sized model (the first n of each workload, so every contender scores
    # the same pairs). Sized so the default run (2 models x 3 workloads x 6 contenders) took 12 minutes on a
    # 2-core AVX512-BF16 CPU; the fidelity reference (hf-fp32, float32 like st-default, which took ~70 s
    # per model there) adds an estimated 2-3 minutes; bigger runs: --n-pairs.
    n_pairs: dict[str, int] = Field(default_factory=lambda: {"dl19": 256, "long": 24, "multilingual": 256})
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

    @field_validator("workloads")
    @classmethod
    def _known_workloads(cls, names: list[str]) -> list[str]:
        return _known(names, WORKLOADS, "workload")

    @field_validator("models")
    @classmethod
    def _known_models(cls, names: list[str]) -> list[str]:
        return _known(names, ARCHITECTURES, "model")

    @field_validator("contenders")
    @classmethod
    def _known_contenders(cls, names: list[str]) -> list[str]:
        return _known(names, CONTENDERS, "contender")


def _known(names: list[str], known, what: str) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or names}; choose from {sorted(known)}")
    return names
