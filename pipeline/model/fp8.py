"""float8 Linear layers for Hopper GPUs (W8A8 in e4m3) through `torch._scaled_mm`.

    weight   (out, in) -> e4m3 (out, in), scale (out,)   once at load:  w ~ q * scale[:, None]
    x        (n, in)   -> e4m3 (n, in),   scale (n, 1)   at every call: x ~ q * scale   (per token)
    y (n, out) = _scaled_mm(q_x, q_w.T, scale_a=(n, 1), scale_b=(1, out)) + bias, in the compute dtype

Only the encoder's Linear layers (Wqkv, out_proj, fc1, fc2) run in float8; embeddings, LayerNorm, attention,
GELU and the head stay in the compute dtype (bf16 on CUDA). Scales are per output channel and per token, so
a pair's score never depends on the pairs it was packed with, and a row slice of a layer (the last layer's
queries for the first token only) quantizes to exactly those rows of the whole layer's float8 weights.

Hopper (compute capability 9.0) and Ada (8.9) have float8 tensor cores: there `_scaled_mm` with row-wise
scales runs cuBLASLt's fp8 GEMM at twice bf16's peak. On CPU, torch 2.13 runs the same op as a reference
(unpacked, slow): the CPU tests check the quantization and packing here, never its speed. Speed and fidelity
against bf16 on a GPU: `scripts/gpu_check.py` (not measured until a GPU runs it).

CUDA's `_scaled_mm` wants K and N (the layer's input and output widths) multiples of 16, checked at load;
the supported models' layers are 768, 2,304 and 3,072 wide. The token count M is free: no padding, no copy.

Work per Linear layer and call: one fused reduction for the row maxima (vector_norm with ord=inf, no |x| copy),
one division, clamp and cast to e4m3 (in bf16 on CUDA: no float32 copy of the input), the GEMM with the bias
fused into its epilogue, then GELU or the residual add in place on its output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.model import device as runtime
from pipeline.model.quantization import encoder_linears

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
WIDTH_MULTIPLE = 16  # K and N of CUDA's float8 GEMM


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row: x (rows, cols) -> (q e4m3 (rows, cols), scale float32 (rows, 1)), x ~ q * scale.

    A row's largest |value| maps to E4M3_MAX; an all-zero row gets scale 1 (its q is zero either way).
    A bf16 `x` is divided in bf16 by a scale rounded to bf16 (so the scale it was divided by is exactly the one
    returned): no float32 copy of the activations; the one extra rounding is 2^-8 against e4m3's 2^-4."""
    x = x.detach()
    amax = torch.linalg.vector_norm(
        x, ord=math.inf, dim=1, keepdim=True, dtype=torch.float32
    )  # (rows, 1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    work = x if x.dtype == torch.bfloat16 else x.float()
    if work.dtype != torch.float32:
        scale = scale.to(work.dtype).float()
    q = torch.div(work, scale.to(work.dtype)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class Fp8Linear:
    """One Linear layer (or a row slice of it) in float8: weights quantized once, activations per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        if out_features % WIDTH_MULTIPLE or in_features % WIDTH_MULTIPLE:
            raise ValueError(
                f"float8 needs Linear layers whose widths are multiples of {WIDTH_MULTIPLE}, got "
                f"{in_features} -> {out_features}; use bfloat16 for this model"
            )
        q, scale = quantize_rows(weight)  # (out, in), (out, 1)
        self.q_weight_t = q.t()  # (in, out), column-major: the layout _scaled_mm wants
        self.weight_scale = scale.reshape(1, -1).contiguous()  # (1, out)
        self.bias = None if bias is None else bias.detach()

    def __call__(
        self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (n, in) -> (n, out) in x's dtype; then GELU (`activation`: "none" = erf, or "tanh") or + residual."""
        q_x, x_scale = quantize_rows(x)  # (n, in), (n, 1)
        bias = self.bias if self.bias is not None and self.bias.dtype == x.dtype else None
        out = torch._scaled_mm(
            q_x,
            self.q_weight_t,
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=x.dtype,
        )  # (n, out)
        if self.bias is not None and bias is None:
            out.add_(self.bias)
        if activation is not None:
            torch.ops.aten.gelu_(out, approximate=activation)  # in place: no second (n, out) tensor
        return out if residual is None else out.add_(residual)


class Fp8Weights:
    """What `modeling.linear` asks for with the float8 kernel: an `Fp8Linear` per (layer, output rows),
    quantized at load from the model's weights in the compute dtype."""

    def __init__(self, model: nn.Module):
        self.names = {id(module): name for name, module in encoder_linears(model).items()}
        self._cache: dict[tuple, Fp8Linear] = {}
        for module in encoder_linears(model).values():  # quantize at load, not on the first batch
            self.get(module, None)

    def get(self, layer: nn.Linear, rows: slice | None) -> Fp8Linear:
        key = (self.names[id(layer)], None if rows is None else (rows.start, rows.stop))
        hit = self._cache.get(key)
        if hit is None:
            weight = layer.weight if rows is None else layer.weight[rows]
            bias = layer.bias if rows is None or layer.bias is None else layer.bias[rows]
            hit = self._cache[key] = Fp8Linear(weight, bias)
        return hit

    def describe(self) -> dict:
        return {
            "activations": "e4m3 per token, dynamic",
            "weights": "e4m3 per output channel",
            "layers": len(self.names),
        }


def fp8_kernel_works(device: torch.device) -> bool:
    """Whether `_scaled_mm` with row-wise scales runs on `device` (a tiny probe): CUDA needs float8 tensor
    cores (compute capability 8.9 or 9.0+); CPU builds of torch run it as a reference."""
    if runtime.is_cuda(device) and runtime.RUNTIME.capability(device) < (8, 9):
        return False
    place = runtime.RUNTIME.placement(device)
    try:
        q = torch.zeros(16, 16, device=place).to(E4M3)
        torch._scaled_mm(
            q,
            q.t(),
            scale_a=torch.ones(16, 1, device=place),
            scale_b=torch.ones(1, 16, device=place),
            out_dtype=torch.bfloat16,
        )
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False
