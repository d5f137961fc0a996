"""`CrossEncoder`: load a reranker checkpoint and score (query, document) pairs.

Drop-in for jina-reranker-v2's own methods (`compute_score`, `rerank`: same names, arguments and
results), without remote code, on packed sequences, with micro-batches cut by a token budget.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.core import dtypes
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model import device as runtime
from pipeline.model.checkpoint import DUMMY_MARKER, inspect_checkpoint, resolve_model_directory
from pipeline.model.decoder import load_decoder_model
from pipeline.model.fp8 import Fp8Weights, fp8_kernel_works
from pipeline.model.modeling import (
    ONEDNN_FUSED,
    ONEDNN_INT8,
    SCALED_MM_FP8,
    CrossEncoderModel,
    PackedWeights,
    linear,
    select_attention_backend,
    select_linear_kernel,
)
from pipeline.model.packing import PackedBatch, pack, token_budget_batches
from pipeline.model.quantization import (
    CALIBRATION_PAIRS,
    InputRangeObserver,
    Int8Options,
    Int8Weights,
    smoothing_for,
)
from pipeline.model.templates import resolve_template
from pipeline.model.tokenization import PairTokenizer
from pipeline.model.weights import load_model

logger = logging.getLogger(__name__)

# The names `dtype` takes (pipeline/core/dtypes.py). int8 is asked for by name only (`auto` never picks it): int8
# Linear layers, everything else float32 (quantization.py).
DTYPES = {name: getattr(torch, attribute) for name, attribute in dtypes.TORCH_NAMES.items()}


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of everything but the quantized Linear layers: float32 beside int8; beside float8, bf16 on
    CUDA and float32 on CPU (where float8 runs only as a reference: see fp8.py)."""
    if dtype == torch.int8:
        return torch.float32
    if dtype == torch.float8_e4m3fn:
        return torch.bfloat16 if runtime.is_cuda(device) else torch.float32
    return dtype


# Tokens per micro-batch. CPU, measured (the engine on the jina-base-sized benchmark checkpoint, bf16, 2-core
# AMD EPYC Zen 5 with AVX512-BF16, best of 2-3 interleaved passes): DL19 pairs (~98 tokens) reach
# 712 / 725 / 674 GFLOP/s at budgets of 2,048 / 4,096 / 8,192 tokens; the long workload (~735 tokens)
# 517 / 526 / 503 (the machine's peak bf16 GEMM: ~925). 4,096 rows keep the GEMMs efficient while the
# activations (4,096 x 3,072 bf16 = 24 MB for fc1) stay near the L3 cache (32 MB); it is also the batch
# size oneDNN's packed weights are laid out for (`PackedWeights`).
# CUDA: not measured yet (scripts/gpu_check.py); 65,536 fills a large GPU with short pairs.
# Threads: torch's default, one per core. Measured on the same machine, DL19: 347 GFLOP/s with 1 thread,
# 589 with 2.
DEFAULT_MAX_TOKENS = {"cpu": 4096, "cuda": 65536}


def cpu_has_bf16_matrix_units() -> bool:
    """AMX or AVX512-BF16, read from the CPU's flags (what the int8 kernel comparison reports beside). `dtype:
    auto` does not decide by them: it measures (`cpu_auto_dtype`)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


# bf16 is chosen only when its GEMM runs at least this much faster than float32's: bf16 costs fidelity
# (see the parity tests), so a tie or a noisy few percent keeps float32.
BF16_MIN_SPEEDUP = 1.2
# The probe's GEMM: 512 tokens through a 768 -> 3,072 Linear layer (jina-base's fc1), in the kernel the engine
# runs on CPU (oneDNN with packed weights where this build has it). 2.4 GFLOP a call. A 256 x 768 x 768 GEMM
# was too small: on the loaded 2-core AVX512-BF16 EPYC (2026-12-07) it showed bf16 at 1.0-2.3x fp32, this
# shape 1.7-3.6x (the benchmark measured bf16's GEMM peak at 2.0x fp32's on that CPU).
PROBE_SHAPE = (512, 768, 3072)
PROBE_SECONDS = 0.05  # per dtype and round, after one warm-up call
PROBE_ROUNDS = (
    3  # the dtypes alternate and each keeps its best round, so a busy spell slows both alike
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def gemm_rate(
    dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = PROBE_SECONDS
) -> float:
    """GFLOP/s of one (tokens, in) x (in, out) Linear layer in `dtype` on this CPU: best call within `seconds`."""
    tokens, d_in, d_out = shape
    device = torch.device("cpu")
    kernel = select_linear_kernel(device, dtype)
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out).to(dtype)
    x = torch.randn(tokens, d_in, generator=generator).to(dtype)
    packed = PackedWeights(tokens) if kernel == ONEDNN_FUSED else None
    with torch.inference_mode():
        linear(
            kernel, x, layer, packed=packed
        )  # warm-up: oneDNN builds its primitive, packs the weights
        best, deadline = float("inf"), time.perf_counter() + seconds
        for _ in range(1000):
            start = time.perf_counter()
            linear(kernel, x, layer, packed=packed)
            best = min(best, time.perf_counter() - start)
            if start >= deadline:
                break
    return 2 * tokens * d_in * d_out / best / 1e9


def _dtype_cache_path() -> str:
    root = os.environ.get(
        "RERANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rerank-pipeline")
    )
    return os.path.join(root, "cpu-dtype.json")


def cpu_auto_dtype(
    rate: Callable[[torch.dtype], float] = gemm_rate, path: str | None = None
) -> torch.dtype:
    """What `dtype: auto` runs on this CPU: bfloat16 if its GEMM probe is at least BF16_MIN_SPEEDUP x float32's.

    Decided once per machine and torch version and remembered in `path` (default: cpu-dtype.json in the
    per-user cache, $RERANK_CACHE or ~/.cache/rerank-pipeline), keyed by CPU model and torch version: a noisy
    probe must not flip the choice between runs, since the score cache's fingerprint names the dtype.
    `rate(dtype)` -> GFLOP/s measures (`gemm_rate`; all rounds of both dtypes take well under a second).
    """
    path = path or _dtype_cache_path()
    key = f"{_cpu_model()} | torch {torch.__version__}"
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16"):
        return DTYPES[entry["dtype"]]
    fp32 = bf16 = 0.0
    for _ in range(PROBE_ROUNDS):
        fp32, bf16 = max(fp32, rate(torch.float32)), max(bf16, rate(torch.bfloat16))
    choice = "bfloat16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "float32"
    logger.info(
        "dtype auto on this CPU: %s (GEMM probe: float32 %.0f GFLOP/s, bfloat16 %.0f GFLOP/s; bfloat16 "
        "needs %.1fx); remembered in %s",
        choice,
        fp32,
        bf16,
        BF16_MIN_SPEEDUP,
        path,
    )
    known = known if isinstance(known, dict) else {}
    known[key] = {
        "dtype": choice,
        "float32_gflops": round(fp32, 1),
        "bfloat16_gflops": round(bf16, 1),
    }
    try:  # written whole and renamed: concurrent scorers starting together read either nothing or all of it
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cpu-dtype-")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(staging, path)
    except OSError as e:  # a read-only home still scores, it only probes again next time
        logger.warning(
            "could not remember the dtype choice in %s (%s); it is probed again next start", path, e
        )
    return DTYPES[choice]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return (
            runtime.RUNTIME.placement(torch.device("cuda"))
            if runtime.RUNTIME.available()
            else torch.device("cpu")
        )
    device = torch.device(device)
    if device.type == "cuda":
        if not runtime.RUNTIME.available():
            raise CheckpointError(
                "device 'cuda' was requested but no CUDA device is available; use device='cpu'"
            )
        return runtime.RUNTIME.placement(device)
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA (fp16 where the GPU lacks bf16); on CPU what its GEMM probe found faster
    (`cpu_auto_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if runtime.is_cuda(device):
            return torch.bfloat16 if runtime.RUNTIME.supports_bf16() else torch.float16
        return cpu_auto_dtype()
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    kind = "cuda" if runtime.is_cuda(device) else device.type
    if dtype == "int8" and not dtypes.runs_on(dtype, kind, reference=True):
        raise CheckpointError(
            f"dtype int8 runs on CPU only (oneDNN's int8 linear), not on {device.type}; "
            "use bfloat16 there"
        )
    if dtype == "float8" and not (
        dtypes.runs_on(dtype, kind, reference=True) and fp8_kernel_works(device)
    ):
        raise CheckpointError(
            f"dtype float8 needs float8 tensor cores (Hopper or Ada GPUs, torch._scaled_mm), which "
            f"{device.type} here lacks; use bfloat16"
        )
    return DTYPES[dtype]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


class CrossEncoder:
    """A reranker: checkpoint weights + the checkpoint's tokenizer + the packed-sequence model."""

    def __init__(
        self,
        model: CrossEncoderModel,
        tokenizer: PairTokenizer,
        *,
        name: str,
        revision: str,
        layout: str,
        device: torch.device,
        dtype: torch.dtype,
        is_dummy: bool = False,
        attention_backend: str | None = None,
        int8: Int8Options | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.is_dummy = is_dummy
        self.int8_options: Int8Options | None = None
        compute = compute_dtype(dtype, device)  # int8, float8: all but the encoder's Linear layers
        self.model.attention_backend = select_attention_backend(
            device, compute, prefer=attention_backend
        )
        self.model.linear_kernel = select_linear_kernel(device, compute)
        self.max_length = model.config.max_tokens_per_sequence
        self.max_tokens_per_batch = DEFAULT_MAX_TOKENS["cuda" if runtime.is_cuda(device) else "cpu"]
        self._copy_stream = (
            None  # CUDA: the side stream host-to-device copies run on (`_score_on_cuda`)
        )
        if self.model.linear_kernel == ONEDNN_FUSED:
            self.model.packed_weights = PackedWeights(self.max_tokens_per_batch)
        if dtype == torch.int8:
            self.quantize(int8 or Int8Options())
        if dtype == torch.float8_e4m3fn:
            self.model.packed_weights = Fp8Weights(self.model)
            self.model.linear_kernel = SCALED_MM_FP8

    def quantize(self, options: Int8Options) -> None:
        """Run the encoder's Linear layers in int8 from now on (the model's float32 weights are the source).

        With `options.smooth_alpha`, first scores `options.calibration_pairs` in float32 to find each layer's
        input range per channel (SmoothQuant). Costs a second copy of those layers' weights, in int8.
        """
        try:
            int8_kernel = select_linear_kernel(self.device, torch.int8)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        fp32_kernel = select_linear_kernel(self.device, torch.float32)
        fp32_weights = (
            PackedWeights(self.max_tokens_per_batch) if fp32_kernel == ONEDNN_FUSED else None
        )
        smooth = None
        if options.smooth_alpha is not None:
            observer = InputRangeObserver(self.model)
            self.model.linear_kernel, self.model.packed_weights = ONEDNN_INT8, observer
            pairs = list(options.calibration_pairs or CALIBRATION_PAIRS)
            self.compute_score(pairs, max_length=min(512, self.max_length), return_logits=True)
            smooth = smoothing_for(self.model, observer.input_amax, options.smooth_alpha)
        self.model.packed_weights = Int8Weights(
            self.model, options, smooth, self.max_tokens_per_batch, fp32_weights
        )
        self.model.linear_kernel = int8_kernel
        self.int8_options = options

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        *,
        allow_pickle: bool = False,
        attention_backend: str | None = None,
        max_chars_per_token: int | None = None,
        int8: Int8Options | None = None,
        template: str | None = None,
        instruction: str | None = None,
    ) -> CrossEncoder:
        """A local directory, a Hugging Face hub id, or `dummy:<architecture>` (random weights, see dummy.py).

        Decoder rerankers (Qwen3-Reranker) read pairs through a prompt template (`templates.py`): `template`
        names it (None: the checkpoint's known one), `instruction` fills its instruction field (None: the
        template's default).

        dtype "int8": Linear layers in int8 on CPU (see quantization.py), tuned by `int8` (default
        `Int8Options()`: SmoothQuant with alpha 0.5 on `CALIBRATION_PAIRS`, every layer in int8).
        """
        directory, revision = resolve_model_directory(name_or_path, revision)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if int8 is not None and dtype != torch.int8:
            raise CheckpointError(
                f"int8 options were given for dtype {str(dtype).replace('torch.', '')}; "
                "pass dtype='int8' or drop them"
            )
        layout, _ = inspect_checkpoint(directory, allow_pickle=allow_pickle)
        prompt = resolve_template(template, name_or_path, directory, layout and layout.name)
        if prompt is None and instruction is not None:
            raise ConfigError(
                f"an instruction was given, but {name_or_path} is read without a prompt template "
                "(a cross-encoder reads the bare pair); drop the instruction"
            )
        kwargs = {} if max_chars_per_token is None else {"max_chars_per_token": max_chars_per_token}
        tokenizer = None
        if prompt is not None:  # the template's answer tokens pick the LM head's rows
            tokenizer = PairTokenizer.from_dir(
                directory,
                return_token_types=False,
                prompt=prompt,
                instruction=instruction,
                **kwargs,
            )
            model, layout, raw_config = load_decoder_model(
                directory, tokenizer.prompt.answer_ids, allow_pickle=allow_pickle
            )
        else:
            model, layout, raw_config = load_model(directory, allow_pickle=allow_pickle)
        model.to(device=device, dtype=compute_dtype(dtype, device))
        # The head stays float32: two tiny matrices, and the raw logit is the product.
        model.head.float()
        if tokenizer is None:
            tokenizer = PairTokenizer.from_dir(
                directory, return_token_types=model.config.type_vocab_size > 1, **kwargs
            )
        encoder = cls(
            model,
            tokenizer,
            name=name_or_path,
            revision=revision,
            layout=layout.name,
            device=device,
            dtype=dtype,
            is_dummy=bool(raw_config.get(DUMMY_MARKER)),
            attention_backend=attention_backend,
            int8=int8,
        )
        encoder.directory = directory
        logger.info(
            "loaded %s (%s layout, revision %s) on %s in %s",
            name_or_path,
            layout.name,
            revision,
            device,
            str(dtype).replace("torch.", ""),
        )
        return encoder

    def describe(self) -> dict:
        """What a job's summary records about the model."""
        return (
            {
                "model": self.name,
                "revision": self.revision,
                "layout": self.layout,
                "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device),
                "attention_backend": self.model.attention_backend,
                "linear_kernel": self.model.linear_kernel,
                "random_weights": self.is_dummy,
                "num_parameters": sum(p.numel() for p in self.model.parameters()),
            }
            | ({} if self.int8_options is None else {"int8": self.model.packed_weights.describe()})
            | (
                {}
                if self.tokenizer.prompt is None
                else {
                    "template": self.tokenizer.prompt.template.name,
                    "instruction": self.tokenizer.prompt.instruction,
                }
            )
            | (
                {"float8": self.model.packed_weights.describe()}
                if self.dtype == torch.float8_e4m3fn
                else {}
            )
        )

    # -- scoring token ids ------------------------------------------------------------------------------

    def score_packed(self, batch: PackedBatch) -> np.ndarray:
        """Raw float32 logits, (batch,), for one packed micro-batch."""
        logits = self.model(
            batch.input_ids.to(self.device),
            batch.cu_seqlens.to(self.device),
            batch.max_seqlen,
            None if batch.token_type_ids is None else batch.token_type_ids.to(self.device),
            seqlens=batch.seqlens,
        )
        return logits.cpu().numpy()

    def score_tokens(
        self,
        input_ids: Sequence[np.ndarray],
        token_type_ids: Sequence[np.ndarray] | None = None,
        max_tokens_per_batch: int | None = None,
        max_batch_size: int | None = None,
        on_micro_batch: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Raw logits (n,) float32 in input order; micro-batches cut by a token budget over length-sorted rows.
        `on_micro_batch()` is called as each micro-batch's logits are back (a heartbeat for long calls)."""
        logits = np.empty(len(input_ids), dtype=np.float32)
        if len(input_ids) == 0:
            return logits
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        budget = max_tokens_per_batch or self.max_tokens_per_batch
        batches = token_budget_batches(lengths, budget, max_batch_size)
        if runtime.is_cuda(self.device):
            self._score_on_cuda(input_ids, token_type_ids, batches, logits, on_micro_batch)
            return logits
        for index in batches:
            types = None if token_type_ids is None else [token_type_ids[i] for i in index]
            logits[index] = self.score_packed(pack([input_ids[i] for i in index], types))
            if on_micro_batch is not None:
                on_micro_batch()
        return logits

    def _score_on_cuda(
        self,
        input_ids,
        token_type_ids,
        batches: list[np.ndarray],
        logits: np.ndarray,
        on_micro_batch: Callable[[], None] | None = None,
    ) -> None:
        """`score_tokens` on a GPU: one host sync per micro-batch, and the GPU never waits for the host.

        Per micro-batch i: the host packs batch i+1 into pinned memory and queues its copy on a side stream
        while the GPU runs batch i; batch i's logits come back into pinned memory by a non-blocking copy,
        and the host waits for them (the one sync) only after batch i+1's forward is queued.
        """
        rt = runtime.RUNTIME
        if self._copy_stream is None:
            self._copy_stream = rt.side_stream(self.device)

        def upload(index: np.ndarray):
            types = None if token_type_ids is None else [token_type_ids[i] for i in index]
            batch = pack([input_ids[i] for i in index], types)
            host = [
                rt.pin(t)
                for t in (batch.input_ids, batch.cu_seqlens, batch.token_type_ids)
                if t is not None
            ]
            with rt.on(self._copy_stream):
                on_device = [t.to(self.device, non_blocking=True) for t in host]
                copied = rt.record(self._copy_stream)
            return batch, on_device, copied

        def collect(pending) -> None:
            index, host_logits, done = pending
            rt.host_wait(done)
            logits[index] = host_logits.numpy()
            if on_micro_batch is not None:
                on_micro_batch()

        pending, upcoming = None, upload(batches[0])
        for i, index in enumerate(batches):
            batch, on_device, copied = upcoming
            rt.wait(copied)  # the compute stream waits for the copy on the GPU; the host goes on
            for t in on_device:
                rt.keep_for_current_stream(t)
            ids, cu_seqlens = on_device[0], on_device[1]
            types = on_device[2] if len(on_device) > 2 else None
            out = self.model(
                ids, cu_seqlens, batch.max_seqlen, types, seqlens=batch.seqlens
            )  # (batch,) float32
            host_logits = rt.empty_pinned((len(index),), torch.float32)
            host_logits.copy_(out, non_blocking=True)
            done = rt.record()
            if i + 1 < len(batches):
                upcoming = upload(batches[i + 1])
            if pending is not None:
                collect(pending)
            pending = (index, host_logits, done)
        collect(pending)

    # -- jina's API -------------------------------------------------------------------------------------

    def compute_score(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        max_length: int = 1024,
        *,
        return_logits: bool = False,
        max_tokens_per_batch: int | None = None,
    ):
        """Scores of (query, document) pairs in input order: sigmoid(logit) like jina, or raw logits.

        A single pair (a 2-tuple of strings, or a list holding one pair) returns a bare float, as jina does.
        `batch_size` caps pairs per micro-batch; the token budget `max_tokens_per_batch` is what really cuts them.
        """
        if (
            isinstance(sentence_pairs, (tuple, list))
            and len(sentence_pairs) == 2
            and all(isinstance(x, str) for x in sentence_pairs)
        ):
            sentence_pairs = [tuple(sentence_pairs)]
        pairs = list(sentence_pairs)
        for i, pair in enumerate(pairs):
            if not (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and all(isinstance(x, str) for x in pair)
            ):
                raise TypeError(
                    f"sentence_pairs[{i}] must be a (query, document) pair of strings, got {pair!r:.80}"
                )
        if not pairs:
            return []
        max_length = min(max_length, self.max_length)
        ids, types = self.tokenizer.encode_pairs(
            [p[0] for p in pairs], [p[1] for p in pairs], max_length
        )
        logits = self.score_tokens(ids, types, max_tokens_per_batch, batch_size)
        scores = logits if return_logits else _sigmoid(logits)
        result = [float(s) for s in scores]
        return result[0] if len(result) == 1 else result

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        max_query_length: int = 512,
        max_length: int = 1024,
        overlap: int = 80,
        top_n: int | None = None,
        batch_size: int | None = None,
    ) -> list[dict]:
        """Documents best first: [{"index", "document", "relevance_score"}], jina's windowing and max-combination.

        Long documents are split into overlapping windows (see `PairTokenizer.windows`); a document's score
        is the best of its windows. Ties keep input order. An empty document is scored, not an error.

        A decoder reranker (read through a prompt template) scores each document once, as `compute_score`
        does: a document over `max_length` loses its tail, and `max_query_length` and `overlap` (the windows'
        settings) are unused. The reference code of these models (the Qwen3-Reranker model card,
        mxbai-rerank, FlagEmbedding) reads one prompt per pair and cuts a long document's tail; a maximum
        over windows, each a prompt of its own, is a scoring they were neither trained nor evaluated with.
        """
        documents = list(documents)
        if not documents:
            return []
        max_length = min(max_length, self.max_length)
        if self.tokenizer.prompt is not None:
            ids, types = self.tokenizer.encode_pairs(
                [query] * len(documents), documents, max_length
            )
            owners = list(range(len(documents)))
        else:
            ids, types, owners = self.tokenizer.windows(
                query, documents, max_length, max_query_length, overlap
            )
        window_scores = _sigmoid(self.score_tokens(ids, types, max_batch_size=batch_size))
        best = np.full(len(documents), -np.inf)
        np.maximum.at(best, np.asarray(owners), window_scores)
        order = sorted(range(len(documents)), key=lambda i: (-best[i], i))
        top_n = len(order) if top_n is None else min(top_n, len(order))
        return [
            {"index": int(i), "document": documents[i], "relevance_score": float(best[i])}
            for i in order[:top_n]
        ]
