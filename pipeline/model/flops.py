"""Model FLOPs of a cross-encoder forward pass, and the machine's peak GEMM FLOP/s to divide them by.

MFU = (model FLOPs of the pairs scored / seconds) / peak GEMM FLOP/s of the same dtype on the same machine.

Model FLOPs are the multiply-adds (x2) the *score* needs, counted on real tokens only, identical for every
contender, so padding, recomputation and the last layer's unneeded rows count as waste, never as work:

    per layer l < L, per sequence of n real tokens (hidden h, FFN f):
        linear   n * 2 * (h*3h + h*h + 2*h*f)         # Wqkv, out_proj, fc1, fc2
        attention       4 * n^2 * h                   # QK^T and (softmax)V, all heads together
    last layer (only the first token feeds the head):
        linear   n * 2 * (2*h*h)                       # keys and values of every token
               + 1 * 2 * (h*h + h*h + 2*h*f)           # query, out_proj and the MLP of the first token
        attention       4 * n * h                      # one query row against n keys
    head: 2 * (h*h + h*num_labels)

Decoder rerankers (Qwen3): queries heads*head_dim wide and keys, values kv_heads*head_dim (grouped-query), so
`h*3h + h*h` is `h*q + 2*h*kv + q*h`; causal attention counts n(n+1)/2 (query, key) pairs; the last token is the
one the head reads; the head is one row (2*h).
Gated MLPs (ModernBERT's GeGLU, GTE's): fc1 is 2f wide, so `2*h*f` above is `3*h*f`. ModernBERT's local layers see
at most 2w + 1 keys per query (w = local_attention / 2): n^2 above is the count of (query, key) pairs in the band;
its last layer (and every layer of a mean-pooled one) runs whole when it is local or the pooling reads every token.

Embedding lookups, LayerNorm, GELU, softmax and residual adds are left out (not GEMMs; < 1% of the
FLOPs at these sizes). A contender that runs the whole last layer or pads does more arithmetic than this,
and that shows as a lower MFU: the figure says how much of the machine went into the answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.decoder_config import DECODER_LAYOUTS, decoder_config_from_json


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    num_labels: int = 1
    gated: bool = False  # fc1 is 2 * intermediate wide (GeGLU)
    # Per layer: whether it attends only within `local_window` tokens on either side.
    local_layers: tuple[bool, ...] = ()
    local_window: int = 0
    cls_last: bool = True  # the last layer computes the first token's rows only
    # Decoder rerankers (Qwen3): query width heads * head_dim and key/value width kv_heads * head_dim (0: hidden),
    # causal attention (each query sees its own and earlier tokens), a one-row score head without a dense layer.
    query_width: int = 0
    kv_width: int = 0
    decoder: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """From a transformers-style config.json dict."""
        shape = cls(
            config["hidden_size"],
            config["num_hidden_layers"],
            config["intermediate_size"],
            config.get("num_labels", len(config.get("id2label", {0: 0}))),
        )
        if config.get("model_type") in DECODER_LAYOUTS:
            from dataclasses import replace

            decoder = decoder_config_from_json(config, config["model_type"])
            return replace(
                shape,
                num_labels=1,
                gated=True,
                query_width=decoder.num_attention_heads * decoder.head_dim,
                kv_width=decoder.num_key_value_heads * decoder.head_dim,
                decoder=True,
            )
        if config.get("model_type") in ("modernbert", "gte"):
            from dataclasses import replace

            from pipeline.model.rope_config import CONFIG_READERS

            rope = CONFIG_READERS[config["model_type"]](config)
            local = rope.local_layers
            shape = replace(
                shape,
                gated=True,
                local_layers=local,
                local_window=rope.local_window,
                cls_last=rope.pooling == "cls" and not (local and local[-1]),
            )
        return shape


def _attended_pairs(n: np.ndarray, window: int | None) -> float:
    """(query, key) pairs attention computes over sequences of lengths n: all, or those within the band."""
    if window is None:
        return float((n**2).sum())
    wide = n > window + 1
    band = n * (2 * window + 1) - window * (window + 1)
    return float(np.where(wide, band, n**2).sum())


def model_flops(shape: Shape, seqlens: Sequence[int] | np.ndarray) -> float:
    """FLOPs to score sequences of the given real token counts (formula in the module docstring)."""
    return sum(linear_and_attention_flops(shape, seqlens))


def linear_and_attention_flops(
    shape: Shape, seqlens: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """`model_flops` in its two parts: (Linear layers and head, attention's QK^T and PV)."""
    n = np.asarray(seqlens, dtype=np.float64)
    h, f, layers = shape.hidden, shape.intermediate, shape.layers
    q, kv = shape.query_width or h, shape.kv_width or h
    mlp = (3 if shape.gated else 2) * h * f
    projections = h * q + 2 * h * kv + q * h  # q, k, v and out_proj (4h^2 for an encoder)
    local = shape.local_layers or (False,) * layers
    # A causal query sees its own and earlier tokens: n(n + 1) / 2 pairs per sequence.
    causal_pairs = float((n * (n + 1) / 2).sum())
    linear = attention = 0.0
    for i in range(layers - 1):
        window = shape.local_window if local[i] else None
        linear += n.sum() * 2 * (projections + mlp)
        attention += 4 * q * (causal_pairs if shape.decoder else _attended_pairs(n, window))
    if shape.cls_last:  # keys and values of every token; query, out_proj and MLP of one token
        linear += n.sum() * 2 * (2 * h * kv) + len(n) * 2 * (2 * h * q + mlp)
        attention += 4 * q * n.sum()
    else:
        window = shape.local_window if local[layers - 1] else None
        linear += n.sum() * 2 * (projections + mlp)
        attention += 4 * q * _attended_pairs(n, window)
    head = len(n) * 2 * (h if shape.decoder else h * h + h * shape.num_labels)
    return float(linear + head), float(attention)


def linear_flops_per_token(shape: Shape) -> float:
    """FLOPs of every layer's Linear layers for one token (q, k, v, out_proj and the MLP, gated or not, the
    grouped-query widths of a decoder): what a model costs per token, attention and the last layer's shortcut
    left out, to size work by model."""
    h, f = shape.hidden, shape.intermediate
    q, kv = shape.query_width or h, shape.kv_width or h
    return 2.0 * (h * q + 2 * h * kv + q * h + (3 if shape.gated else 2) * h * f) * shape.layers


def gemm_shapes(shape: Shape, tokens: int = 4096) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's own Linear layers at `tokens` rows, plus a square one."""
    h, f = shape.hidden, shape.intermediate
    fc1 = 2 * f if shape.gated else f
    return [(tokens, h, 3 * h), (tokens, h, fc1), (tokens, f, h), (2048, 2048, 2048)]


def _gemm_kernels(device: str, dtype: torch.dtype) -> dict:
    """The GEMM implementations a contender can reach: aten's F.linear (MKL for fp32 on CPU, oneDNN for
    bf16) and, on CPU, oneDNN's linear (what our engine and torch.compile call). On AMD CPUs MKL's fp32
    GEMM is ~half of oneDNN's, so a peak from F.linear alone would flatter every fp32 MFU."""
    kernels = {"F.linear": torch.nn.functional.linear}
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if device == "cpu" and op is not None and torch.backends.mkldnn.is_available():
        kernels["onednn_linear"] = lambda x, w, b: op(x, w, b, "none", [], "")
    return kernels


def peak_gemm_flops(
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int, int]],
    seconds_per_shape: float = 1.0,
    device: str = "cpu",
) -> dict:
    """The best FLOP/s a linear layer (weights (n, k), bias on) reaches on any of `shapes` with any kernel.

    Linear layers are the GEMMs every contender runs, so this is the ceiling they all run under. Each
    (shape, kernel) is timed for about `seconds_per_shape`; its best repetition counts (GEMM time only).
    """
    results = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=generator).to(device, dtype)
        w = torch.randn(n, k, generator=generator).to(device, dtype)
        b = torch.randn(n, generator=generator).to(device, dtype)
        for name, kernel in _gemm_kernels(device, dtype).items():
            try:
                kernel(x, w, b)
            except (RuntimeError, NotImplementedError):
                continue  # this kernel does not take this dtype here
            best, spent = float("inf"), 0.0
            while spent < seconds_per_shape:
                _sync(device)
                start = time.perf_counter()
                kernel(x, w, b)
                _sync(device)
                elapsed = time.perf_counter() - start
                best, spent = min(best, elapsed), spent + elapsed
            results[f"{name} {m}x{k}x{n}"] = 2.0 * m * k * n / best
    return {
        "flops_per_s": max(results.values()),
        "by_kernel_and_shape": results,
        "dtype": str(dtype).replace("torch.", ""),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
