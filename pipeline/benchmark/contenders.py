"""The contenders: every way of scoring (query, document) pairs that the benchmark puts side by side.

Each contender loads the same checkpoint directory, tokenizes with the same tokenizer (its
`tokenizer.json`), truncates at the same `max_length`, and returns raw logits in input order. What it is
timed on starts with the pairs as Python strings and ends with the logits: tokenization is included for
everyone, model loading for no one but the Ray job (which loads the model in its actors on every run).

| name            | what it is                                                                  | dtype    |
|-----------------|-----------------------------------------------------------------------------|----------|
| `st-default`    | sentence-transformers `CrossEncoder(dir).predict(pairs)`, documented defaults (batch 32) | float32 (as stored) |
| `st-best`       | the same in bfloat16, batch size tuned on the workload (best of `tune_batch_sizes`)      | bfloat16 |
| `hf-padded`     | transformers `AutoModelForSequenceClassification`, padded batches in input order         | bfloat16 |
| `hf-sorted`     | the same, pairs sorted by token length first (FlagEmbedding's reranker does this)         | bfloat16 |
| `engine`        | ours, in process: `CrossEncoder.from_pretrained(dir).compute_score(pairs)`               | auto     |
| `engine-fp32`   | ours in float32 (to compare with `st-default` at equal precision)                        | float32  |
| `ray-job`       | the whole Ray rerank job (`pipeline.rerank.api.rerank`), Parquet in -> Parquet out        | auto     |
| `hf-fp32`       | transformers length-sorted in float32: the fidelity reference where `st-default` is not   | float32  |
| `ort-fp32`      | ONNX Runtime (CPUExecutionProvider) on a `torch.onnx.export` of the model, length-sorted  | float32  |
| `ort-int8`      | the same export, `quantize_dynamic` per-channel QInt8 weights                             | int8     |
| `ov-fp32`       | OpenVINO (`convert_model` from torch), INFERENCE_PRECISION_HINT f32, length-sorted        | float32  |
| `ov-default`    | the same, the plugin's own precision (bf16 where the CPU has it)                          | default  |
| `ov-int8`       | the same, static int8 by `nncf.quantize` calibrated on other pairs of the workload         | int8     |

`auto` is what the job runs by default: bfloat16 on GPUs; on CPUs bfloat16 where a short GEMM probe finds it
faster than float32 (AMX, usually AVX512-BF16), float32 elsewhere (AVX2-only CPUs emulate bf16, several times
slower); the row names the dtype it resolved to.

ONNX Runtime and OpenVINO are optional (the `dev` extra installs them); where one is missing or fails, its
rows say `skipped: <reason>` (`onnx_runtime.py`, `openvino.py`, `exported.py`).

Decoder rerankers (a Qwen3-Reranker seq-cls checkpoint): sentence-transformers and transformers score the
pairs formatted through the checkpoint's prompt template as its model card does (`workloads.prompt_pairs`,
the formatting inside the timed pass), padded on the left as the checkpoint's tokenizer says (transformers'
seq-cls head reads the last non-pad token, so either side would do); the engine and the Ray job apply the
template themselves. ONNX Runtime and OpenVINO are not run on decoders (their rows say skipped).

sentence-transformers sorts pairs by character length before batching; the transformers contenders use
the model's default attention (SDPA). Tokens are counted where each contender's model sees them (a
forward pre-hook), so padding efficiency is measured, not modelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.benchmark.scored import Pairs, Scored
from pipeline.benchmark.workloads import prompt_pairs, prompt_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenCounter:
    """Counts real and processed tokens at a transformers model's encoder (a pre-hook; no change to the model).

    The hook sits on `base_model` (the encoder the classification model calls as a module): sentence-
    transformers calls the top model's `.forward` directly, which skips hooks on the top model itself.
    """

    def __init__(self, model: torch.nn.Module):
        self.real = 0
        self.processed = 0
        self.handle = getattr(model, "base_model", model).register_forward_pre_hook(
            self._hook, with_kwargs=True
        )

    def _hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.processed += int(input_ids.numel())
        self.real += int(mask.sum()) if mask is not None else int(input_ids.numel())

    def reset(self) -> None:
        self.real = self.processed = 0


def dtype_name(dtype: torch.dtype) -> str:
    """The engine's name for a torch dtype ("bfloat16", "int8", "float8"), as `from_pretrained` takes it."""
    from pipeline.model.cross_encoder import DTYPES as ENGINE_DTYPES

    return next(
        (name for name, value in ENGINE_DTYPES.items() if value == dtype),
        str(dtype).replace("torch.", ""),
    )


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- sentence-transformers ---------------------------------------------------------------------------------


class SentenceTransformersContender:
    """`sentence_transformers.CrossEncoder.predict`; `dtype=None` keeps its default (the checkpoint's dtype)."""

    def __init__(self, directory: str, max_length: int, dtype: str | None, device: str = "cpu"):
        from sentence_transformers import CrossEncoder
        from transformers import PreTrainedModel

        kwargs = {} if dtype is None else {"model_kwargs": {"dtype": DTYPES[dtype]}}
        self.model = CrossEncoder(directory, max_length=max_length, device=device, **kwargs)
        inner = next(m for m in self.model.modules() if isinstance(m, PreTrainedModel))
        self.dtype = str(next(inner.parameters()).dtype).replace("torch.", "")
        self.counter = TokenCounter(inner)
        self.template = prompt_template(directory)

    def score(self, pairs: Pairs, batch_size: int = 32) -> Scored:
        self.counter.reset()
        template = self.template
        logits, seconds = _timed(
            lambda: self.model.predict(
                list(pairs) if template is None else prompt_pairs(template, list(pairs)),
                batch_size=batch_size,
                show_progress_bar=False,
                activation_fn=torch.nn.Identity(),
            )
        )
        return Scored(
            np.asarray(logits, dtype=np.float32).reshape(-1),
            seconds,
            self.counter.real,
            self.counter.processed,
            self.dtype,
            {"batch_size": batch_size},
        )


# -- transformers ------------------------------------------------------------------------------------------


class TransformersContender:
    """`AutoModelForSequenceClassification` on padded batches, in input order or sorted by token length."""

    def __init__(
        self, directory: str, max_length: int, dtype: str, length_sorted: bool, device: str = "cpu"
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(directory, dtype=DTYPES[dtype])
            .to(device)
            .eval()
        )
        self.device = device
        self.max_length = max_length
        self.length_sorted = length_sorted
        self.dtype = dtype
        self.counter = TokenCounter(self.model)
        self.template = prompt_template(directory)

    @torch.inference_mode()
    def _forward(self, features) -> np.ndarray:
        features = {k: v.to(self.device) for k, v in features.items()}
        return self.model(**features).logits[:, 0].float().cpu().numpy()

    def _input_order(self, pairs: Pairs, batch_size: int) -> np.ndarray:
        """What most scripts do: tokenize each slice of `batch_size` pairs, pad to its longest, run."""
        out = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            features = self.tokenizer(
                [q for q, _ in chunk],
                [d for _, d in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out.append(self._forward(features))
        return np.concatenate(out)

    def _sorted(self, pairs: Pairs, batch_size: int) -> np.ndarray:
        """FlagEmbedding's reranker: tokenize everything, sort by token count (longest first), pad per batch."""
        encoded = self.tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            truncation=True,
            max_length=self.max_length,
        )
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(pairs))]
        order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
        logits = np.empty(len(pairs), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            features = self.tokenizer.pad([rows[i] for i in index], return_tensors="pt")
            logits[index] = self._forward(features)
        return logits

    def score(self, pairs: Pairs, batch_size: int = 32) -> Scored:
        pairs = list(pairs)
        self.counter.reset()
        run = self._sorted if self.length_sorted else self._input_order
        template = self.template
        logits, seconds = _timed(
            lambda: run(pairs if template is None else prompt_pairs(template, pairs), batch_size)
        )
        return Scored(
            logits,
            seconds,
            self.counter.real,
            self.counter.processed,
            self.dtype,
            {
                "batch_size": batch_size,
                "length_sorted": self.length_sorted,
                "attention": self.model.config._attn_implementation,
                "padding_side": self.tokenizer.padding_side,
            },
        )


# -- our engine --------------------------------------------------------------------------------------------


class EngineContender:
    """`pipeline.model.CrossEncoder.compute_score`, in process."""

    def __init__(
        self,
        directory: str,
        max_length: int,
        dtype: str,
        device: str = "cpu",
        max_tokens_per_batch: int | None = None,
    ):
        from pipeline.model import CrossEncoder

        self.model = CrossEncoder.from_pretrained(directory, device=device, dtype=dtype)
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch
        # `auto` resolved, by the name the engine takes ("int8", "float8"): what the rows' MFU divides by.
        self.dtype = dtype_name(self.model.dtype)
        self.processed = 0
        self.model.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.processed += int(args[0].numel())

    def score(self, pairs: Pairs, batch_size: int | None = None) -> Scored:
        self.processed = 0
        logits, seconds = _timed(
            lambda: np.asarray(
                self.model.compute_score(
                    list(pairs),
                    max_length=self.max_length,
                    return_logits=True,
                    max_tokens_per_batch=self.max_tokens_per_batch,
                ),
                dtype=np.float32,
            ).reshape(-1)
        )
        # Packed: every processed token is a real token of a pair.
        return Scored(
            logits,
            seconds,
            self.processed,
            self.processed,
            self.dtype,
            {
                "max_tokens_per_batch": self.max_tokens_per_batch
                or self.model.max_tokens_per_batch,
                "attention_backend": self.model.model.attention_backend,
            },
        )


# -- the whole Ray job -------------------------------------------------------------------------------------


class RayJobContender:
    """`pipeline.rerank.api.rerank` end to end: Parquet in -> Ray Data (read, tokenize, score, write,
    rank) -> Parquet out, in this process as the driver, at the job's default settings plus `overrides`.

    Timed: the whole call, Ray's start and the actors' model loading included (the job pays them on every
    run); `job_pairs_per_s` is the job's own scoring-phase rate from summary.json. Query ids are the query
    texts' hashes (the job ranks per query), doc ids the row numbers; scores come back by row number.
    """

    def __init__(
        self,
        directory: str,
        max_length: int,
        dtype: str,
        device: str = "cpu",
        overrides: Sequence[str] = (),
    ):
        from pipeline.model.cross_encoder import resolve_device, resolve_dtype

        self.directory, self.max_length, self.device = directory, max_length, device
        self.job_dtype = dtype  # what the job is given
        self.dtype = dtype_name(
            resolve_dtype(dtype, resolve_device(device))
        )  # what it resolves to: the row's
        self.overrides = list(overrides)

    def score(self, pairs: Pairs, batch_size: int | None = None) -> Scored:
        import hashlib
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.benchmark.workloads import pair_token_counts
        from pipeline.core import schema
        from pipeline.core.config import load_config
        from pipeline.rerank.api import rerank
        from pipeline.rerank.config import RerankConfig

        pairs = list(pairs)
        tokens = int(pair_token_counts(self.directory, pairs, self.max_length).sum())
        config = load_config(
            RerankConfig, None, self.overrides, model=self.directory, dtype=self.job_dtype
        )
        config.tokenizer.max_length = self.max_length
        config.scorer.device = "cuda" if self.device.startswith("cuda") else "cpu"
        with tempfile.TemporaryDirectory(prefix="benchmark-ray-job-") as tmp:
            table = pa.table(
                {
                    schema.QUERY_ID: [hashlib.sha1(q.encode()).hexdigest()[:16] for q, _ in pairs],
                    schema.QUERY: [q for q, _ in pairs],
                    schema.DOC_ID: [str(i) for i in range(len(pairs))],
                    schema.DOCUMENT: [d for _, d in pairs],
                }
            )
            pq.write_table(table, f"{tmp}/input.parquet")
            start = time.perf_counter()
            result = rerank(config, f"{tmp}/input.parquet", f"{tmp}/output")
            seconds = time.perf_counter() - start
            summary = result.summary
            logits = np.full(len(pairs), np.nan, dtype=np.float32)
            for batch in result.iter_batches([schema.DOC_ID, schema.SCORE]):
                rows = np.asarray(batch.column(schema.DOC_ID).to_pylist(), dtype=np.int64)
                logits[rows] = batch.column(schema.SCORE).to_numpy(zero_copy_only=False)
        return Scored(
            logits,
            seconds,
            tokens,
            tokens,
            self.dtype,
            {
                "overrides": self.overrides,
                "job_pairs_per_s": summary.get("pairs_per_s"),
                "job_seconds": summary.get("seconds"),
                "scored_rows": summary.get("scored_rows"),
                "rejected_rows": summary.get("rejected_rows"),
                "job_tokens": summary.get("tokens"),
            },
        )


# -- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    description: str
    library: str  # sentence-transformers | transformers | engine | ray-job | onnxruntime | openvino
    dtype: str | None  # default compute dtype; None: the library's default (the checkpoint's dtype)
    length_sorted: bool = False
    tuned_batch_size: bool = False  # batch size picked per workload from `tune_batch_sizes`
    calibrated: bool = (
        False  # loaded with calibration pairs (the workloads' pairs after the timed ones)
    )

    @property
    def optional(self) -> bool:
        """A backend outside the project's dependencies: a failure is a skipped row, not an error of the run."""
        return self.library in ("onnxruntime", "openvino")

    @property
    def full_precision(self) -> bool:
        """float32 contenders are slow on CPU: they get the capped pair count."""
        return self.dtype in (None, "float32")


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender(
            "st-default",
            "sentence-transformers CrossEncoder.predict, documented defaults (batch 32)",
            "sentence-transformers",
            None,
        ),
        Contender(
            "st-best",
            "sentence-transformers CrossEncoder.predict, bf16, batch size tuned",
            "sentence-transformers",
            "bfloat16",
            tuned_batch_size=True,
        ),
        Contender(
            "hf-padded",
            "transformers AutoModelForSequenceClassification, padded batches in input order",
            "transformers",
            "bfloat16",
        ),
        Contender(
            "hf-sorted",
            "transformers AutoModelForSequenceClassification, length-sorted batches (FlagEmbedding)",
            "transformers",
            "bfloat16",
            length_sorted=True,
        ),
        # dtype auto, as the job runs it: bf16 where the CPU's GEMM probe finds it faster, else fp32 (AVX2-only CPUs
        # emulate bf16, several times slower than fp32); `engine-fp32` and `engine-int8` are the pinned rows.
        Contender(
            "engine",
            "our engine, compute_score in process (packed, token-budget micro-batches), dtype auto",
            "engine",
            "auto",
        ),
        Contender("engine-fp32", "our engine in float32", "engine", "float32"),
        Contender(
            "engine-int8",
            "our engine with int8 Linear layers (oneDNN; weights per channel, activations per "
            "token, SmoothQuant), the rest float32",
            "engine",
            "int8",
        ),
        Contender(
            "ray-job",
            "the whole Ray rerank job, Parquet in -> ranked Parquet out (Ray start included), "
            "dtype auto",
            "ray-job",
            "auto",
        ),
        Contender(
            "hf-fp32",
            "transformers AutoModelForSequenceClassification, float32, length-sorted batches "
            "(the fidelity reference where st-default cannot be)",
            "transformers",
            "float32",
            length_sorted=True,
        ),
        Contender(
            "ort-fp32",
            "ONNX Runtime CPUExecutionProvider, torch.onnx.export (dynamo) of the model, fp32, "
            "length-sorted, batch size tuned",
            "onnxruntime",
            "float32",
            tuned_batch_size=True,
        ),
        Contender(
            "ort-int8",
            "ONNX Runtime, the same export after quantize_dynamic (per-channel QInt8 weights), "
            "batch size tuned",
            "onnxruntime",
            "int8",
            tuned_batch_size=True,
        ),
        Contender(
            "ov-fp32",
            "OpenVINO CPU, convert_model from torch, INFERENCE_PRECISION_HINT f32, batch size tuned",
            "openvino",
            "float32",
            tuned_batch_size=True,
        ),
        Contender(
            "ov-default",
            "OpenVINO CPU, convert_model from torch, the plugin's default precision, batch size "
            "tuned",
            "openvino",
            None,
            tuned_batch_size=True,
        ),
        Contender(
            "ov-int8",
            "OpenVINO CPU, static int8 (nncf.quantize, calibrated on the workloads' pairs after the "
            "timed ones), batch size tuned",
            "openvino",
            "int8",
            tuned_batch_size=True,
            calibrated=True,
        ),
    ]
}


def load_contender(
    name: str,
    directory: str,
    *,
    max_length: int,
    device: str = "cpu",
    dtype: str | None = None,
    max_tokens_per_batch: int | None = None,
    ray_job_overrides: Sequence[str] = (),
    calibration_pairs: Pairs = (),
):
    """An object with `score(pairs, batch_size) -> Scored`; `dtype` overrides the contender's default (the
    engine takes any dtype string its `from_pretrained` accepts; ONNX Runtime and OpenVINO ignore it: their
    precision is in their name)."""
    spec = CONTENDERS[name]
    dtype = dtype or spec.dtype
    if spec.optional and prompt_template(directory) is not None:
        raise ValueError(f"{name} is not benchmarked on decoder rerankers (prompt-formatted pairs)")
    if spec.library == "onnxruntime":
        from pipeline.benchmark.onnx_runtime import OnnxRuntimeContender

        return OnnxRuntimeContender(directory, max_length, int8=spec.dtype == "int8")
    if spec.library == "openvino":
        from pipeline.benchmark.openvino import OpenVinoContender

        precision = {"float32": "f32", None: "default", "int8": "int8"}[spec.dtype]
        return OpenVinoContender(directory, max_length, precision, calibration_pairs)
    if spec.library == "sentence-transformers":
        return SentenceTransformersContender(directory, max_length, dtype, device)
    if spec.library == "transformers":
        return TransformersContender(directory, max_length, dtype, spec.length_sorted, device)
    if spec.library == "ray-job":
        return RayJobContender(directory, max_length, dtype, device, ray_job_overrides)
    return EngineContender(directory, max_length, dtype, device, max_tokens_per_batch)


def tune_batch_size(
    contender, pairs: Pairs, batch_sizes: Sequence[int]
) -> tuple[int, dict[int, float]]:
    """The batch size with the most pairs/s on `pairs` (a sample of the workload), and the pairs/s of every
    size tried: sizes in increasing order, stopping at the first one slower than the best so far. On CPUs
    pairs/s rises with the batch size up to a point and falls after it, so stopping early nearly always picks
    the size trying all would, in less time (the figures: results/performance.md, "Figures behind choices in
    the benchmark's code").
    """
    speeds: dict[int, float] = {}
    for size in sorted(set(batch_sizes)):
        run = contender.score(pairs, batch_size=size)
        speeds[size] = len(pairs) / run.seconds
        if speeds[size] < max(speeds.values()):
            break
    return max(speeds, key=speeds.get), speeds
