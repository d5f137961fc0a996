"""Settings of the rerank job (and of every job that reranks through it): defaults here, YAML in configs/."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.core.config import StrictModel
from pipeline.core.dtypes import Dtype


class InputConfig(StrictModel):
    format: Literal["auto", "long", "grouped"] = (
        "auto"  # auto: grouped if the candidates column exists
    )
    query_id_column: str = "query_id"
    query_column: str = "query"
    doc_id_column: str = "doc_id"
    document_column: str = "document"
    candidates_column: str = "candidates"  # grouped format: list<struct<doc_id, document, ...>>
    # Input files are cut into shards of about this many rows (whole Parquet row groups). A shard is the
    # unit of resume: a rerun skips shards whose manifest was written, and a crash loses at most the shards in
    # flight. 20,000 pairs is ~8 minutes of the base model on 2 CPU cores (42 pairs/s measured for the whole
    # job on an AMD EPYC, results/benchmark-cpu-ray-job-20k.md); a GPU commits as much sooner as it is faster
    # (GPU throughput not measured yet). A shard costs one manifest, so smaller is cheap.
    rows_per_shard: int = Field(20_000, ge=1)
    # A row group whose data pages cannot be decoded (corrupt compressed data, bad page header, failed page
    # checksum) while its footer reads fine. fail: the job stops with one line naming the file. reject: the
    # row group's rows go to rejected/ with reason `unreadable_file` (counted from the Parquet metadata).
    on_unreadable: Literal["fail", "reject"] = "fail"


class TokenizerConfig(StrictModel):
    max_length: int = Field(1024, ge=8)  # jina-reranker-v2's limit; capped by the model's positions
    max_chars_per_token: int = Field(
        32, ge=1
    )  # texts are cut to max_length * this before tokenizing
    long_documents: Literal["truncate", "windows"] = (
        "truncate"  # windows: jina's rerank() chunking, max over windows
    )
    max_query_length: int = Field(512, ge=1)  # windows mode only
    overlap: int = Field(80, ge=0)  # windows mode only
    # Decoder rerankers (Qwen3-Reranker, bge-reranker-v2-gemma) read each pair through a prompt template: a
    # built-in name (qwen3-reranker, bge-reranker-v2-gemma) or a JSON file of its fields
    # (pipeline/model/templates.py). null: the checkpoint's own, known from its name or config.json; a decoder
    # without one is refused. Cross-encoders take none.
    template: str | None = None
    # The template's instruction (what relevant means for this job's pairs). null: the template's default,
    # "Given a web search query, retrieve relevant passages that answer the query" for Qwen3-Reranker.
    # (bge-reranker-v2-gemma's is the question after the passage, which this text then replaces.)
    instruction: str | None = None
    # Tokenizer actors. auto (or null): sized at start from the cluster the job finds, enough to keep the GPU
    # scorers fed at their measured (else FLOPs-estimated) rate, capped by the CPUs of the nodes matching
    # label_selector (pipeline/rerank/capacity.py); the decision is logged in one line with its inputs.
    num_actors: Literal["auto"] | Annotated[int, Field(ge=1)] | None = 1
    num_cpus: float = Field(0.5, gt=0)
    batch_size: int = Field(1024, ge=1)  # rows handed to one tokenizer call
    # Ray node labels the tokenizer actors must run on, e.g. {"ray.io/node-group": "cpu-tokenizers"} on
    # KubeRay, to keep CPU work off the GPU nodes. None: anywhere.
    label_selector: dict[str, str] | None = None


class ScorerConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs
    # Actors in the fixed-size pool. None: one per GPU in the cluster (num_gpus_per_actor each), or 1 on CPU.
    num_actors: int | None = Field(None, ge=1)
    num_gpus_per_actor: float = Field(1.0, gt=0, le=8)  # fractional for small models
    num_cpus: float = Field(1.0, gt=0)  # per actor; on a CPU-only machine the actor's compute share
    torch_threads: int | None = Field(
        None, ge=1
    )  # CPU scoring threads per actor (None: every core)
    max_tokens_per_batch: int | None = Field(
        None, ge=16
    )  # None: the engine's default for the device
    max_tasks_in_flight_per_actor: int = Field(
        2, ge=1
    )  # >= 2 so the next batch is ready when one finishes
    batch_size: int = Field(2048, ge=1)  # rows handed to one scorer call (not a micro-batch)
    # A GPU check's report (scripts/gpu_check.py, gpu-check.json): its measured pairs/s size
    # tokenizer.num_actors auto when the score cache has no GPU run of this model to measure from.
    gpu_check: str | None = None


class IoConfig(StrictModel):
    """The storage-bound stages: reading shards, writing staging files, ranking buckets (one pool each)."""

    # Ray tasks at a time per stage (the key's name is older than the tasks). One keeps up with a CPU scorer
    # or a few GPUs; with many GPUs the single writer becomes the queue (each scorer call's rows are a Parquet
    # write), so give it more.
    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)  # per task: I/O waits, so a fraction of a core
    # Scored rows the writer gathers before writing staging files. Each write makes one file per (shard,
    # ranking bucket) it touches, so small writes multiply files (and PUTs, manifest entries, ranking reads);
    # a shard commits with the write that completes it. Stages upstream stream in small blocks whatever this is.
    rows_per_write: int = Field(20_000, ge=1)
    # Object-store memory for blocks between the stages (Ray Data's resource limit). Without it Ray Data
    # lets the cheap stages (read, tokenize) run ahead of the scorer by a fraction of the whole object
    # store, and memory grows with the input: measured with the tiny model, whole-job PSS 2.7 GB at 100k
    # pairs, 3.2 GB after 100k of 1M. 256 MB is over a minute of tokens for a CPU scorer; with many GPUs
    # give ~256 MB per scorer. A batch waits whole in this budget, so the batch sizes above (in rows) are cut to
    # 1/16 of it in bytes (compose.hand_offs); a pair bigger than that is refused before any work.
    in_flight_mb: int = Field(256, ge=16)
    # The scoring phase ends with an error (exit 3; a rerun resumes the committed shards) when nothing was scored
    # or written for this long while work remains, rather than waiting forever. A scorer inside a long call sends
    # a heartbeat every 10 s, so a slow device is not a stall; at least 20 s, and twice progress_interval_s (the
    # driver hears of progress through those polls).
    stall_timeout_s: float = Field(600.0, ge=20)
    # The output's single-writer lease (`_lease.json`): its holder refreshes it every lease_heartbeat_s; a
    # lease silent for lease_timeout_s is taken over by the next run (at once when its holder ran on the same
    # machine and is gone). Raise the timeout if the driver may stall longer (a paused VM).
    lease_heartbeat_s: float = Field(10.0, gt=0)
    lease_timeout_s: float = Field(120.0, gt=0)
    # On object storage, create --output's bucket (and cache.uri's) if it does not exist. Off: a missing bucket
    # is an error, so a typo in its name does not make a new bucket on the account.
    create_bucket: bool = False


class OutputConfig(StrictModel):
    top_k: int | None = Field(None, ge=1)  # keep only the best k per query in ranked/
    rows_per_bucket: int = Field(1_000_000, ge=1)  # long input: ranking buckets by hash(query_id)
    # Carry each pair's query and document texts through to ranked/ (columns `query`, `document`), for
    # consumers that need them beside the scores (hard negatives). Off by default: texts are otherwise
    # dropped after tokenizing, so only token ids cross the scorer and ids cross the ranking shuffle.
    carry_texts: bool = False


class CacheConfig(StrictModel):
    """The score cache (pipeline/rerank/cache.py): pairs scored by an earlier run with the same model and settings
    are not scored again. Off unless `uri` is set."""

    uri: str | None = None  # local folder or object-storage URI, shared by runs
    # Buckets of a new cache's key space (an existing cache keeps its own): a run joins its keys with one
    # bucket per task, so a bucket should fit an I/O actor's memory (24 bytes an entry: 10M entries, 240 MB).
    buckets: int = Field(32, ge=1, le=65536)


class Int8Config(StrictModel):
    """How `dtype: int8` quantizes (pipeline/model/quantization.py); only for dtype int8."""

    # SmoothQuant's migration strength, 0..1: the higher, the more of the activations' range (a few channels are
    # 10-100x louder in BERT-family models) moves into the weights before quantizing; 0.5 is the paper's default.
    # null turns smoothing off: each Linear layer skips one pass over its input (about 20% faster per layer,
    # measured on an AVX2 CPU), at the price of coarser int8 steps for every channel beside such outliers.
    smooth_alpha: float | None = Field(0.5, ge=0, le=1)
    # Linear layers kept in float32, as fnmatch patterns of their names: `layers.11.mlp.fc2`, `layers.*.mlp.fc2`
    # (layer i has layers.i.mixer.Wqkv, layers.i.mixer.out_proj, layers.i.mlp.fc1, layers.i.mlp.fc2). Each layer
    # kept trades its int8 speed for float32 products; fc2, whose inputs (GELU outputs) have the widest range,
    # loses the most fidelity in int8. A pattern that matches no layer of the checkpoint is an error.
    fp32_layers: list[str] = []


class RerankConfig(StrictModel):
    model: str = "jinaai/jina-reranker-v2-base-multilingual"
    revision: str | None = None
    # auto: bf16 on CUDA; on CPU bf16 where a short GEMM probe, remembered per machine, finds it at least 1.2x
    # faster than fp32, else fp32. int8 (CPU only, never chosen by auto):
    # the encoder's Linear layers in int8, everything else fp32 (pipeline/model/quantization.py).
    # float8 (GPU scorers with float8 tensor cores only, Hopper or Ada; never chosen by auto): the encoder's Linear
    # layers in e4m3 through torch._scaled_mm, everything else bf16 (pipeline/model/fp8.py).
    dtype: Dtype = "auto"  # names and which device runs each: pipeline/core/dtypes.py
    int8: Int8Config = Int8Config()  # dtype int8 only
    allow_pickle: bool = False
    input: InputConfig = InputConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    scorer: ScorerConfig = ScorerConfig()
    io: IoConfig = IoConfig()
    output: OutputConfig = OutputConfig()
    cache: CacheConfig = CacheConfig()
    storage_options: dict = {}  # passed to fsspec (s3fs: key, secret, endpoint_url...)
    ray_address: str | None = (
        None  # None: RAY_ADDRESS if set, else a fresh local Ray; "auto": the running cluster
    )
    progress_interval_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _stall_outlasts_polls(self) -> RerankConfig:
        if self.io.stall_timeout_s < 2 * self.progress_interval_s:
            raise ValueError(
                f"io.stall_timeout_s ({self.io.stall_timeout_s:g}) must be at least twice "
                f"progress_interval_s ({self.progress_interval_s:g}): the watchdog hears of progress "
                "through those polls"
            )
        return self

    def result_settings(self) -> dict:
        """The settings that change what the job writes; a resumed run must match them. Hand-off batch
        sizes, actor counts, the token budget and where Ray runs change only speed, so they may differ."""
        return self.model_dump(
            mode="json",
            include={
                # on_unreadable is left out: a run that stopped on an unreadable file (fail) committed no shard
                # holding its rows, so the same output may resume with reject. The cache is left out: it changes
                # which pairs are scored, never their scores.
                "model": True,
                "revision": True,
                "dtype": True,
                "input": {
                    "format",
                    "query_id_column",
                    "query_column",
                    "doc_id_column",
                    "document_column",
                    "candidates_column",
                    "rows_per_shard",
                },
                # The prompt settings only when set, so outputs written before they existed still resume.
                "tokenizer": {
                    "max_length",
                    "max_chars_per_token",
                    "long_documents",
                    "max_query_length",
                    "overlap",
                }
                | {
                    key
                    for key in ("template", "instruction")
                    if getattr(self.tokenizer, key) is not None
                },
                "output": True,
                # Only int8 reads them (other dtypes must leave them at their defaults), so outputs of other dtypes
                # written before the section existed still resume.
                **({"int8": True} if self.dtype == "int8" else {}),
            },
        )


def validate_rerank_step(rerank: RerankConfig, why_every_score: str) -> RerankConfig:
    """The check on the `rerank:` section of a job that reranks as one of its steps (hard negatives, index
    quality), for its pydantic `field_validator("rerank")`: such a job needs every candidate's score, so
    `output.top_k` stays unset (`why_every_score` says what the job would lose), and it passes its own top-level
    storage options to the step, so the section sets none. Raises ValueError (pydantic's), returns `rerank`."""
    if rerank.output.top_k is not None:
        raise ValueError(f"rerank.output.top_k must stay unset: {why_every_score}")
    if rerank.storage_options:
        raise ValueError(
            "set storage_options at the top level; the rerank step uses the same options"
        )
    return rerank
