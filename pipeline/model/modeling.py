"""The cross-encoder, inference only, on packed (unpadded) sequences.

One file, top to bottom: config -> attention backends -> linear kernels -> embeddings -> layer -> encoder -> head.
It covers the three checkpoint families we load (see `checkpoint.py`): jina-reranker-v2 (XLM-RoBERTa in
flash-attention's layout), stock XLM-RoBERTa sequence classification (bge-reranker-v2-m3) and BERT
sequence classification (cross-encoder/ms-marco-MiniLM-L6-v2). They share one post-norm transformer;
they differ only in the position offset, token types and where the head's first dense layer comes from.

Packed inputs (the vocabulary of flash-attention's `bert_padding.py`):
    input_ids       (total_tokens,)  int64   every real token of every sequence, back to back
    token_type_ids  (total_tokens,)  int64   or None (all zeros)
    cu_seqlens      (batch + 1,)     int32   sequence b spans [cu_seqlens[b], cu_seqlens[b+1])
    max_seqlen      int                      longest sequence in the batch
No padding token ever enters a Linear, LayerNorm or GELU: they all run on (total_tokens, hidden).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import device as runtime
from pipeline.model.model_config import ModelConfig
from pipeline.model.quantization import int8_kernel_works

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Attention backends. Chosen in exactly one place (`select_attention_backend`) and logged once per choice.
# ---------------------------------------------------------------------------------------------------------

FLASH_ATTN = "flash_attn_varlen"  # the flash-attn package's varlen kernel (CUDA, fp16/bf16)
TORCH_VARLEN = (
    "torch_varlen_attn"  # torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16, no extra package)
)
SDPA_GROUPED = "sdpa_length_grouped"  # SDPA over length-grouped sub-batches (any device, any dtype)

_logged_choices: set[tuple] = set()
# (runtime, kernel, device type, dtype) -> (usable, why not): each kernel is probed once per process.
_probes: dict[tuple, tuple[bool, str]] = {}


def torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_attn_varlen():
    """flash-attn's varlen kernel; raises ImportError (or whatever a broken build raises) when unusable."""
    return importlib.import_module("flash_attn").flash_attn_varlen_func


@functools.cache
def varlen_options(varlen_attn) -> dict:
    """num_splits=1 where this torch offers it: no split-KV, so a sequence's attention is computed the same
    way whatever else is in the batch (batch invariance); split-KV only pays off for a handful of
    sequences, never for scoring batches of thousands."""
    return {"num_splits": 1} if "num_splits" in inspect.signature(varlen_attn).parameters else {}


@functools.cache
def varlen_takes_scale(varlen_attn) -> bool:
    """torch releases before 2.10 have a varlen_attn without `scale` (it always divides by sqrt(head_dim))."""
    return "scale" in inspect.signature(varlen_attn).parameters


def _call_varlen(kernel: str, fn, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    if kernel == FLASH_ATTN:
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
    if varlen_takes_scale(fn):
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **varlen_options(fn))
    if not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
        raise ValueError(
            "this torch's varlen_attn has no `scale` argument and the model needs a non-default one"
        )
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **varlen_options(fn))


def _probe_varlen(kernel: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether `kernel` imports and runs a two-sequence attention on `device` in `dtype` (once per process).

    A flash-attn wheel built for another torch or CUDA imports its extension lazily and fails only at the
    first call, in every scorer actor, which Ray then restarts forever: so the probe calls it here.
    """
    key = (runtime.RUNTIME, kernel, device.type, dtype)
    if key not in _probes:
        try:
            fn = flash_attn_varlen() if kernel == FLASH_ATTN else torch_varlen_attn()
            if fn is None:
                raise ImportError(
                    "torch.nn.attention.varlen.varlen_attn is missing (torch older than 2.9)"
                )
            place = runtime.RUNTIME.placement(device)
            x = torch.ones(3, 1, 8, dtype=dtype, device=place)  # (tokens, heads, head_dim)
            cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=place)
            out = _call_varlen(kernel, fn, x, x, x, cu, cu, 2, 2, 1.0 / math.sqrt(8))
            if tuple(out.shape) != (3, 1, 8):
                raise RuntimeError(f"returned shape {tuple(out.shape)}")
            _probes[key] = (True, "")
        except Exception as e:  # noqa: BLE001 - a broken extension raises anything (ImportError, OSError, RuntimeError)
            _probes[key] = (
                False,
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
            )
            logger.warning(
                "attention backend %s unusable, falling back (%s)", kernel, _probes[key][1]
            )
    return _probes[key]


def select_attention_backend(
    device: torch.device, dtype: torch.dtype, prefer: str | None = None
) -> str:
    """Pick the fastest exact kernel available for (device, dtype); log the choice and why, once.

    Every backend computes the same softmax(QK^T / sqrt(d)) V per sequence; they differ only in float
    rounding (checked by the parity tests), so the choice never changes results beyond tolerance.
    On CUDA each varlen kernel is imported and run once on a tiny input before it is chosen (`_probe_varlen`).
    """
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = runtime.is_cuda(device)
    if prefer is not None:
        choice, why = prefer, "requested"
    elif cuda and half and _probe_varlen(FLASH_ATTN, device, dtype)[0]:
        choice, why = FLASH_ATTN, "CUDA, half precision and the flash-attn package works"
    elif cuda and half and _probe_varlen(TORCH_VARLEN, device, dtype)[0]:
        choice, why = (
            TORCH_VARLEN,
            (
                "CUDA, half precision, this torch has varlen_attn (flash-attn: "
                f"{_probe_varlen(FLASH_ATTN, device, dtype)[1] or 'not installed'})"
            ),
        )
    else:
        choice = SDPA_GROUPED
        why = (
            f"{device.type} with {str(dtype).replace('torch.', '')}: no varlen kernel here; SDPA runs on "
            "sub-batches of similar length, so padding touches attention only, never the Linear layers"
        )
        if cuda and half:
            why = (
                f"CUDA without a working varlen kernel (flash-attn: {_probe_varlen(FLASH_ATTN, device, dtype)[1]}; "
                f"torch varlen_attn: {_probe_varlen(TORCH_VARLEN, device, dtype)[1]}): padded SDPA groups"
            )
    key = (choice, device.type, dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("attention backend: %s (%s)", choice, why)
    return choice


def _length_groups(seqlens: list[int], min_fill: float = 0.8) -> list[list[int]]:
    """Sequence indices grouped so that every length in a group is >= min_fill * the group's longest.

    Attention cost of a group is len(group) * max_len^2, so this bounds the padded-attention waste at
    about 1 / min_fill^2 whatever order the caller packed sequences in. Length-sorted micro-batches (what
    the scorer sends) usually form a single group.
    """
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and seqlens[i] >= min_fill * seqlens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def equal_length_runs(seqlens: list[int]) -> list[tuple[int, int]]:
    """[first, last) index ranges of consecutive sequences that share one length."""
    runs, first = [], 0
    for i in range(1, len(seqlens) + 1):
        if i == len(seqlens) or seqlens[i] != seqlens[first]:
            runs.append((first, i))
            first = i
    return runs


# oneDNN builds (and caches, up to 1,024 by default) one primitive per GEMM shape; a packed micro-batch's
# row count is its token total, a new number almost every call, so a long-running scorer kept creating
# primitives and its memory grew with every pair. Rounding the rows up to a multiple of 64 (zero rows past
# the last sequence, never attended to, dropped by the head) keeps the shapes few. Measured 2026-12-01 on a
# 2-core AMD EPYC (AVX2), fp32: the rerank job's scorer actor (tiny model, 100k DL19 pairs) grew its anonymous
# memory by 84 MB instead of 175-185 MB; jina-base compute_score on 128 DL19 pairs, best of 3 interleaved,
# 7.01 pairs/s against 7.09 unrounded (within run-to-run noise).
GEMM_ROWS_MULTIPLE = 64


def pad_rows(hidden: torch.Tensor, multiple: int) -> torch.Tensor:
    """(total_tokens, hidden) -> (ceil(total_tokens / multiple) * multiple, hidden), zero rows appended."""
    pad = -hidden.shape[0] % multiple
    return F.pad(hidden, (0, 0, 0, pad)) if pad else hidden


def _sdpa_equal_length_runs(q, k, v, starts, seqlens, cls_only, scale):
    """Exact attention with SDPA on zero-copy views: one call per run of consecutive equal-length sequences.

    A run of m sequences of n tokens is a contiguous (m * n) slice of the packed tokens, so it views as
    (m, heads, n, head_dim) without a gather, and no padding, mask or scatter exists. Length-sorted
    micro-batches (what `score_tokens` sends) make runs as long as the data allows; in any other order the
    runs are single sequences, still exact. Measured on a 2-core AMD EPYC (AVX512-BF16), bf16, whole
    jina-base forward, 4,096-token micro-batches, interleaved best of 3: DL19 601 -> 645 GFLOP/s and long
    449 -> 481 against the padded groups below (their gathers, masks and scatters cost more than the
    padding they remove). SDPA must get 4-D inputs: with 3-D ones torch 2.13 takes its math kernel, ~3x
    slower. Attention is then ~15% of a DL19 forward and ~45% of a long one (SDPA's flash kernel for CPU
    runs at ~170 GFLOP/s against ~850 for the GEMMs).
    """
    out = torch.empty_like(q)
    heads, head_dim = k.shape[1], k.shape[2]
    if not cls_only:
        out[starts[-1] + seqlens[-1] :] = (
            0  # rows past the last sequence (GEMM_ROWS_MULTIPLE): no attention
        )
    for first, last in equal_length_runs(seqlens):
        m, n, start = last - first, seqlens[first], starts[first]
        end = start + m * n
        k_run = k[start:end].view(m, n, heads, head_dim).transpose(1, 2)  # (m, heads, n, head_dim)
        v_run = v[start:end].view(m, n, heads, head_dim).transpose(1, 2)
        if cls_only:
            q_run = q[first:last][:, :, None, :]  # (m, heads, 1, head_dim)
            out[first:last] = F.scaled_dot_product_attention(q_run, k_run, v_run, scale=scale)[
                :, :, 0, :
            ]
        else:
            q_run = (
                q[start:end].view(m, n, heads, head_dim).transpose(1, 2)
            )  # (m, heads, n, head_dim)
            o = F.scaled_dot_product_attention(
                q_run, k_run, v_run, scale=scale
            )  # (m, heads, n, head_dim)
            out[start:end].view(m, n, heads, head_dim).copy_(o.transpose(1, 2))
    return out


@dataclass
class _PaddedGroup:
    """One length group of `_length_groups`, as index tensors on the device (built on the host, copied once
    per forward and shared by every layer, so attention reads no value back from the device).

    gather  (g, max_len) int64  packed token of each padded slot (a sequence's last token repeated past its end)
    mask    (g, 1, 1, max_len) bool, or None when every sequence of the group has max_len tokens
    slots   (valid,) int64      flat index into (g * max_len) of each real token's slot
    tokens  (valid,) int64      packed index of that token (same order)
    rows    (g,) int64          the group's sequences (the query row of each when `cls_only`)
    """

    gather: torch.Tensor
    mask: torch.Tensor | None
    slots: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor


def padded_groups(
    starts: list[int], seqlens: list[int], device: torch.device
) -> list[_PaddedGroup]:
    """`_length_groups` of a packed batch as `_PaddedGroup`s on `device` (host arithmetic, pinned copies)."""

    def upload(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if runtime.is_cuda(device):
            host = runtime.RUNTIME.pin(host)
        return host.to(device, non_blocking=True)

    groups = []
    for group in _length_groups(seqlens):
        lengths = np.asarray([seqlens[i] for i in group], dtype=np.int64)  # (g,)
        first = np.asarray([starts[i] for i in group], dtype=np.int64)  # (g,)
        max_len = int(lengths.max())
        offsets = np.arange(max_len, dtype=np.int64)
        valid = offsets[None, :] < lengths[:, None]  # (g, max_len)
        # Pad by repeating each sequence's last token: the mask hides it as a key, and padded query rows
        # are dropped, so its value never matters.
        gather = first[:, None] + np.minimum(offsets[None, :], lengths[:, None] - 1)  # (g, max_len)
        slots = np.flatnonzero(valid)
        groups.append(
            _PaddedGroup(
                upload(gather),
                None if valid.all() else upload(valid)[:, None, None, :],
                upload(slots),
                upload(gather.reshape(-1)[slots]),
                upload(np.asarray(group, dtype=np.int64)),
            )
        )
    return groups


def _sdpa_grouped(q, k, v, packed: PackedView, cls_only, scale):
    """Exact attention per sequence with torch SDPA over length-grouped sub-batches.

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `cls_only`;
    k, v: (total_tokens, heads, head_dim). Returns q's shape.

    On CPU the groups are runs of equal length (`_sdpa_equal_length_runs`: no padding at all, no copies);
    on CUDA, where every call is a kernel launch, fewer and padded groups win (`padded_groups`).
    """
    if not runtime.is_cuda(k.device):
        return _sdpa_equal_length_runs(q, k, v, packed.starts, packed.seqlens, cls_only, scale)
    if packed.padded_groups is None:
        packed.padded_groups = padded_groups(packed.starts, packed.seqlens, k.device)
    out = torch.empty_like(q)
    heads, head_dim = k.shape[1], k.shape[2]
    for group in packed.padded_groups:
        k_pad = k[group.gather].transpose(1, 2)  # (g, heads, max_len, head_dim)
        v_pad = v[group.gather].transpose(1, 2)
        if not cls_only:
            q_pad = q[group.gather].transpose(1, 2)  # (g, heads, max_len, head_dim)
            o = F.scaled_dot_product_attention(
                q_pad, k_pad, v_pad, attn_mask=group.mask, scale=scale
            )
            out[group.tokens] = o.transpose(1, 2).reshape(-1, heads, head_dim)[group.slots]
        else:
            q_one = q[group.rows][:, :, None, :]  # (g, heads, 1, head_dim)
            o = F.scaled_dot_product_attention(
                q_one, k_pad, v_pad, attn_mask=group.mask, scale=scale
            )
            out[group.rows] = o[:, :, 0, :]
    return out


def varlen_attention(backend, q, k, v, packed: PackedView, cls_only: bool, scale: float):
    """softmax(q k^T * scale) v within each packed sequence.

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `cls_only` (one query per
    sequence, its first token); k, v: (total_tokens, heads, head_dim). Returns q's shape.
    """
    if backend == SDPA_GROUPED:
        return _sdpa_grouped(q, k, v, packed, cls_only, scale)
    cu_seqlens, max_seqlen = packed.cu_seqlens, packed.max_seqlen
    if cls_only:
        if packed.cu_queries is None:
            packed.cu_queries = torch.arange(
                len(packed.seqlens) + 1, dtype=torch.int32, device=q.device
            )
        cu_q, max_q = packed.cu_queries, 1
    else:
        cu_q, max_q = cu_seqlens, max_seqlen
    if backend == FLASH_ATTN:
        fn = flash_attn_varlen()
    elif backend == TORCH_VARLEN:
        fn = torch_varlen_attn()
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return _call_varlen(backend, fn, q, k, v, cu_q, cu_seqlens, max_q, max_seqlen, scale)


# ---------------------------------------------------------------------------------------------------------
# Linear kernels: the GEMM with its epilogue (bias, GELU or the residual add) fused, or aten's ops one by one.
# Chosen in exactly one place (`select_linear_kernel`) and logged once per choice.
# ---------------------------------------------------------------------------------------------------------

ONEDNN_FUSED = "onednn_fused"  # torch.ops.mkldnn._linear_pointwise (CPU): the op torch.compile's CPU backend emits
ATEN_LINEAR = "aten"  # F.linear, then F.gelu / + as separate ops (any device)
ONEDNN_INT8 = "onednn_int8"  # torch.ops.onednn.qlinear_pointwise (CPU): int8 weights and activations (quantization.py)
SCALED_MM_FP8 = (
    "scaled_mm_fp8"  # torch._scaled_mm (Hopper/Ada GPUs): e4m3 weights and activations (fp8.py)
)


def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's fused linear for `dtype` (a tiny probe, once per dtype)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = (
            torch.ones(2, 8, dtype=dtype),
            torch.ones(4, 8, dtype=dtype),
            torch.zeros(4, dtype=dtype),
        )
        y = op.binary(
            op(x, w, b, "gelu", [], "none"),
            torch.ones(2, 8, dtype=dtype),
            torch.ones(8, 4, dtype=dtype),
            torch.zeros(8, dtype=dtype),
            "add",
        )
        return y.shape == (2, 8) and bool(torch.isfinite(y).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def select_linear_kernel(
    device: torch.device, dtype: torch.dtype, prefer: str | None = None
) -> str:
    """oneDNN's fused linear on CPU when this build has it, aten elsewhere; log the choice once.

    `dtype` torch.int8 (asked for, never chosen by `auto`) takes oneDNN's int8 linear on CPU: the choice
    between the int8 kernels this torch offers, with what each measured, is written in `quantization.py`.

    Measured on a 2-core AMD EPYC (Zen 5, AVX512-BF16): fusing bias + GELU into fc1 and the residual add
    into fc2 / out_proj saves passes over (tokens, 3,072) activations; whole jina-base forward in bf16,
    4,096-token micro-batches, interleaved best of 3: DL19 645 -> 725 GFLOP/s, long 481 -> 522. In fp32
    oneDNN's GEMM runs ~1.8x faster than the MKL one F.linear calls here (MKL's fast paths are Intel-only).
    After this, GEMMs and attention take ~98% of a forward: nothing is left for torch.compile to fuse.
    Results differ from aten's only in float rounding (GELU applied before fc1's output is rounded to
    bf16; checked by the parity tests).
    """
    if prefer is not None:
        choice, why = prefer, "requested"
    elif dtype == torch.int8:
        on_cpu = device.type == "cpu" and not runtime.is_cuda(device)
        if not (on_cpu and int8_kernel_works() and _onednn_linear_works(torch.float32)):
            raise ValueError(
                f"int8 scoring needs oneDNN's int8 linear on CPU, which {device.type} with this torch "
                "build lacks; use dtype bfloat16 or float32"
            )
        choice, why = (
            ONEDNN_INT8,
            (
                "int8 asked for: int8 weights per channel, activations per token; "
                "embeddings, LayerNorm, attention and the head in float32"
            ),
        )
    elif device.type == "cpu" and not runtime.is_cuda(device) and _onednn_linear_works(dtype):
        choice, why = (
            ONEDNN_FUSED,
            "CPU with oneDNN: bias, GELU and residual adds fused into the GEMMs",
        )
    else:
        choice, why = ATEN_LINEAR, f"{device.type}: separate aten ops"
    key = ("linear", choice, device.type, dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("linear kernel: %s (%s)", choice, why)
    return choice


class PackedWeights:
    """oneDNN's blocked copies of Linear weights for `ONEDNN_FUSED`, made on first use per (layer, rows).

    Without them oneDNN reorders each weight into its blocked layout on every call. Measured (same machine
    and setup as `select_linear_kernel`): DL19 608 -> 679 GFLOP/s, long 491 -> 510; the outputs are bit for
    bit the same in bf16. Cost: a second copy of the encoder's Linear weights (jina-base: 170 MB in bf16).
    A copy whose source weight changed since (another dtype or device, new values) is made again.
    """

    def __init__(self, batch_size_hint: int):
        self.batch_size_hint = batch_size_hint
        self._cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    def get(self, layer: nn.Linear, rows: slice | None) -> torch.Tensor:
        source = (layer.weight.data_ptr(), layer.weight.dtype, layer.weight._version)
        key = (id(layer), None if rows is None else (rows.start, rows.stop))
        hit = self._cache.get(key)
        if hit is None or hit[0] != source:
            weight = layer.weight if rows is None else layer.weight[rows]
            hit = (
                source,
                torch.ops.mkldnn._reorder_linear_weight(
                    weight.detach().contiguous(), self.batch_size_hint
                ),
            )
            self._cache[key] = hit
        return hit[1]


def linear(
    kernel: str,
    x: torch.Tensor,
    layer: nn.Linear,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    rows: slice | None = None,
    packed: PackedWeights | None = None,
) -> torch.Tensor:
    """layer(x), then GELU (`activation` "none" = erf or "tanh") or `+ residual`: (n, in) -> (n, out).

    `rows` takes a slice of the layer's output features (e.g. only keys and values of a fused Wqkv);
    `packed` supplies oneDNN's blocked weights (ONEDNN_FUSED), the int8 layers (ONEDNN_INT8: an
    `Int8Weights`, whose float32 `fp32` serves the layers kept in float32), or the float8 layers
    (SCALED_MM_FP8: an `fp8.Fp8Weights`).
    """
    if kernel == SCALED_MM_FP8:
        return packed.get(layer, rows)(x, activation, residual)
    if kernel == ONEDNN_INT8:
        quantized = packed.get(layer, rows)
        if quantized is not None:
            return quantized(x, activation, residual)
        kernel, packed = ONEDNN_FUSED, packed.fp32
    bias = layer.bias if rows is None or layer.bias is None else layer.bias[rows]
    if kernel == ONEDNN_FUSED:
        weight = (
            packed.get(layer, rows)
            if packed is not None
            else (layer.weight if rows is None else layer.weight[rows])
        )
        op = torch.ops.mkldnn._linear_pointwise
        if residual is not None:
            return op.binary(x, residual, weight, bias, "add")
        if activation is not None:
            return op(x, weight, bias, "gelu", [], activation)
        return op(x, weight, bias, "none", [], "")
    out = F.linear(x, layer.weight if rows is None else layer.weight[rows], bias)
    if activation is not None:
        out = F.gelu(out, approximate=activation)
    return out if residual is None else out + residual


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids, position_ids, token_type_ids):
        """(total_tokens,) ids -> (total_tokens, hidden)."""
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            return hidden + self.token_type_embeddings.weight[0]
        return hidden + self.token_type_embeddings(token_type_ids)


class SelfAttention(nn.Module):
    """The checkpoint names follow flash-attention's MHA: fused `Wqkv` (q, k, v rows in that order), `out_proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, packed: PackedView, cls_only: bool, residual):
        """out_proj(attention) + residual: (total_tokens, hidden) -> (total_q, hidden)."""
        heads, head_dim, width = self.num_heads, self.head_dim, self.num_heads * self.head_dim
        if cls_only:
            # Keys and values for every token, the query for the first token only.
            kv = linear(
                packed.linear_kernel,
                hidden,
                self.Wqkv,
                rows=slice(width, 3 * width),
                packed=packed.weights,
            )
            k, v = kv.view(-1, 2, heads, head_dim).unbind(
                dim=1
            )  # each (total_tokens, heads, head_dim)
            q = linear(
                packed.linear_kernel,
                hidden[packed.cls_index],
                self.Wqkv,
                rows=slice(0, width),
                packed=packed.weights,
            ).view(-1, heads, head_dim)  # (batch, heads, head_dim)
        else:
            qkv = linear(packed.linear_kernel, hidden, self.Wqkv, packed=packed.weights).view(
                -1, 3, heads, head_dim
            )
            q, k, v = qkv.unbind(dim=1)  # each (total_tokens, heads, head_dim)
        attn = varlen_attention(
            packed.backend, q, k, v, packed, cls_only, 1.0 / math.sqrt(head_dim)
        )
        return linear(
            packed.linear_kernel,
            attn.reshape(attn.shape[0], -1),
            self.out_proj,
            residual=residual,
            packed=packed.weights,
        )


class Mlp(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(
        self, hidden, kernel: str = ATEN_LINEAR, residual=None, packed: PackedWeights | None = None
    ):
        """fc2(gelu(fc1(hidden))) + residual: (tokens, hidden) -> (tokens, hidden)."""
        inner = linear(kernel, hidden, self.fc1, activation=self.approximate, packed=packed)
        return linear(kernel, inner, self.fc2, residual=residual, packed=packed)


class Layer(nn.Module):
    """Post-norm transformer layer (BERT/RoBERTa): x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mixer = SelfAttention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden, packed: PackedView, cls_only: bool = False):
        """(total_tokens, hidden) -> (total_tokens, hidden), or (batch, hidden) when `cls_only`."""
        residual = hidden[packed.cls_index] if cls_only else hidden
        hidden = self.norm1(self.mixer(hidden, packed, cls_only, residual))
        return self.norm2(
            self.mlp(hidden, packed.linear_kernel, residual=hidden, packed=packed.weights)
        )


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the first token (<s> / [CLS]). BERT's pooler is this `dense`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_hidden):
        return self.out_proj(torch.tanh(self.dense(cls_hidden)))


@dataclass
class PackedView:
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    max_seqlen: int
    seqlens: list[int]  # host copies of the lengths and starts: attention never reads them back
    starts: list[int]
    cls_index: torch.Tensor  # (batch,) int64, = cu_seqlens[:-1]
    backend: str  # attention backend
    linear_kernel: str = ATEN_LINEAR
    weights: object = None  # PackedWeights (ONEDNN_FUSED) or quantization.Int8Weights (ONEDNN_INT8)
    padded_groups: list | None = (
        None  # SDPA_GROUPED on CUDA: made by the first layer, reused by the rest
    )
    cu_queries: torch.Tensor | None = field(
        default=None
    )  # (batch + 1,) int32 0..batch, the last layer's queries


def packed_position_ids(cu_seqlens: torch.Tensor, total_tokens: int, offset: int) -> torch.Tensor:
    """Positions restart at `offset` for every packed sequence: (total_tokens,) int64.

    e.g. cu_seqlens [0, 3, 5], offset 2 -> [2, 3, 4, 2, 3] (RoBERTa counts from padding_idx + 1).
    """
    starts = cu_seqlens[:-1].long()
    seqlens = cu_seqlens[1:].long() - starts
    token_index = torch.arange(total_tokens, device=cu_seqlens.device)
    # output_size: without it repeat_interleave reads the lengths' sum back from the device (a sync).
    return token_index - torch.repeat_interleave(starts, seqlens, output_size=total_tokens) + offset


def pack_view(
    model: nn.Module,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlens: list[int] | None,
    cls_index: torch.Tensor,
) -> PackedView:
    """The per-batch view every layer of `model` reads: attention backend, Linear kernel, lengths and starts.

    `model` has `config.max_tokens_per_sequence`, `attention_backend`, `linear_kernel` and `packed_weights`
    (None: chosen for `weight`'s device and dtype). cu_seqlens (batch + 1,) int32; `seqlens` the host's
    copy of the lengths (None: read back from cu_seqlens, which on a GPU waits for the device);
    `cls_index` (batch,) int64: the token each sequence is scored at (its first for an encoder, its last
    for a decoder). Raises ValueError when a sequence is longer than the model takes.
    """
    limit = model.config.max_tokens_per_sequence
    if max_seqlen > limit:
        raise ValueError(
            f"a sequence of {max_seqlen} tokens exceeds the model's "
            f"{limit}-token limit; truncate it first"
        )
    backend = model.attention_backend or select_attention_backend(weight.device, weight.dtype)
    if seqlens is None:
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = np.concatenate(([0], np.cumsum(seqlens[:-1], dtype=np.int64))).tolist()
    kernel = model.linear_kernel or select_linear_kernel(weight.device, weight.dtype)
    return PackedView(
        cu_seqlens,
        max_seqlen,
        seqlens,
        starts,
        cls_index,
        backend,
        kernel,
        model.packed_weights if kernel in (ONEDNN_FUSED, ONEDNN_INT8, SCALED_MM_FP8) else None,
    )


class CrossEncoderModel(nn.Module):
    """Encoder + classification head. `forward` maps a packed batch to (batch,) float32 logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.head = ClassificationHead(config)
        self.attention_backend: str | None = None
        self.linear_kernel: str | None = None
        # Set by `CrossEncoder`: a `PackedWeights` with ONEDNN_FUSED, an `Int8Weights` with ONEDNN_INT8.
        self.packed_weights = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen: int,
        token_type_ids=None,
        seqlens: list[int] | None = None,
    ):
        """input_ids (total_tokens,), cu_seqlens (batch+1,) int32 -> logits (batch,) float32.

        `seqlens`: the host's copy of the lengths (cu_seqlens[1:] - cu_seqlens[:-1]); without it they are read
        back from cu_seqlens, which on a GPU waits for the device.
        """
        packed = pack_view(
            self, self.emb_ln.weight, cu_seqlens, max_seqlen, seqlens, cu_seqlens[:-1].long()
        )
        kernel = packed.linear_kernel
        position_ids = packed_position_ids(
            cu_seqlens, input_ids.numel(), self.config.position_offset
        )
        hidden = self.emb_ln(
            self.embeddings(input_ids, position_ids, token_type_ids)
        )  # (total_tokens, hidden)
        if kernel == ONEDNN_FUSED:
            hidden = pad_rows(hidden, GEMM_ROWS_MULTIPLE)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, packed)
        # Only the first token feeds the head, so the last layer computes queries, the MLP and the norms
        # for that token alone (flash-attention's `last_layer_subset`): about 1/num_layers less work.
        cls_hidden = self.layers[-1](hidden, packed, cls_only=True)  # (batch, hidden)
        # The head is kept in float32 (see `CrossEncoder`): it is tiny, and raw logits are the product.
        return self.head(cls_hidden.to(self.head.dense.weight.dtype))[:, 0].float()
