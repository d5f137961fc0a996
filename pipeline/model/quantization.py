"""int8 Linear layers for CPU scoring (W8A8): weights per output channel at load, activations per token.

    weight   (out, in)  -> int8 (out, in), scale (out,)    symmetric, once at load: w ~ q * scale[:, None]
    x        (n, in)    -> int8 (n, in),   scale (n, 1)    symmetric, at every call (dynamic): x ~ q * scale
    y        (n, out)   =  (q_x @ q_w^T) * scale_x * scale_w + bias      int32 accumulation, exact

Only the encoder's Linear layers (Wqkv, out_proj, fc1, fc2) run in int8; embeddings, LayerNorm, attention and
the classification head stay float32, and packing (`cu_seqlens`, `max_seqlen`) is unchanged.

Why per token, not per tensor: a per-tensor scale is the largest |x| of the whole micro-batch, so a pair's
score would depend on which pairs it was packed with (and a cached score would not equal a cold one). With a
scale per token every row is quantized from its own values only: batch invariance holds as it does in float32.
It also keeps one loud token from coarsening every other token's grid.

Outliers. A few hidden channels of BERT-family activations are 10-100x larger than the rest; per-token
scales then spend the int8 range on them. Two remedies, both in `Int8Options`:
- SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): per input channel j, s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)
  from a small calibration sample; the layer computes (x / s) @ (W * s)^T, the same product with the outlier
  moved from the activations into the weights, which are quantized per channel and absorb it. In these post-norm
  models a LayerNorm's output is also the residual, so x / s cannot be folded into the LayerNorm (as SmoothQuant
  does in pre-norm LLMs): the division runs at each call, one more pass over the input (measured cost below).
- `fp32_layers`: name patterns of Linear layers kept in float32 (e.g. `"layers.*.mlp.fc2"`: its inputs, GELU
  outputs, have the widest range in BERT-family models).

Kernel: oneDNN's int8 matmul through `torch.ops.onednn.qlinear_prepack` / `qlinear_pointwise`, the ops PyTorch's
x86 Inductor int8 path lowers to (not deprecated). Its activation scale is one number, so the per-token scale
and the bias are applied after it (one fused multiply-add pass over the output), and GELU / the residual add run
as their own ops: the fused epilogue of the float32 path (`modeling.select_linear_kernel`) is lost.

Weight range. Without VNNI (AVX2-only CPUs, AVX-512 ones before Cascade Lake) oneDNN multiplies u8 x s8 with
`vpmaddubsw`, which adds pairs of products into int16 and saturates: 2 * 255 * 127 > 32767 (the activations reach
it as u8, see `ACTIVATION_ZERO_POINT`). Weights are then quantized to [-63, 63] (fbgemm's `reduce_range`, on the
weight side), which keeps every sum exact; on VNNI / AMX CPUs they use [-127, 127]. `weight_qmax` finds out with a
probe, not from CPU flags. (With s8 activations an AVX-512 CPU without VNNI ran oneDNN's exact but reference
kernel, so the probe said 127 there; with u8 it runs the fast kernel and says 63, simulated with
ONEDNN_MAX_CPU_ISA=AVX512_CORE.)

Measured (`python -m pipeline.model.int8_kernels --repeats 7`, 2026-11-30, "AMD EPYC" in /proc/cpuinfo, 2 cores,
AVX2 only: no AVX512, VNNI or AMX; other jobs loaded the machine (load average 3-7), so only ratios mean
anything, and they moved by +-30% between runs). One jina-base layer's four Linear layers (hidden 768,
intermediate 3,072), GOP/s relative to the float32 oneDNN fused linear (~33 GOP/s here), 2,048 / 4,096 tokens:
  oneDNN int8, per-token activations (this module)            1.02x / 1.30x   (an earlier run: 0.88x / 1.54x)
    with the SmoothQuant division                             0.87x / 1.05x
  oneDNN int8, per-tensor activations, fused GELU / sum       1.13x / 1.31x   (batch-dependent scores)
  oneDNN int8 matmul alone (no quantizing, no epilogue)       2.54x / 1.86x   (the kernel's ceiling)
  fbgemm `quantized.linear_dynamic` (quantize_dynamic's op)   1.81x / 1.59x   (an earlier run: 1.07x / 1.07x)
  torch._int_mm (512 tokens)                                  0.02x           (~0.6 GOP/s: no fast CPU path)
Whole engine on the same machine (jina-base shape with an 8k vocabulary, 40 DL19 pairs = 12,350 tokens,
2,048-token micro-batches, best of 2): float32 121 tokens/s, int8 106 (0.87x; attention stays float32).
So on this AVX2-only CPU int8 is at best ~1.3x float32 per Linear and no faster for a whole forward: the int8 matmul
itself is ~2x faster, but quantizing each input and the unfused epilogue (per-token scale + bias, then aten's
erf GELU, ~50 ms per fc1 call at 2,048 tokens against ~200 ms for its int8 matmul) eat most of the gain. The
target is CPUs with VNNI (AVX512-VNNI, AVX-VNNI) or AMX, whose int8 dot-product instructions accumulate
straight into int32 (no int16 step) and where weights keep 8 bits (measured below). fbgemm's dynamic linear was sometimes faster, but it is not used:
its activation scale is per tensor (batch-dependent scores), and preparing its weights goes through
`torch.quantize_per_channel`, deprecated in torch 2.13 (it warns). `torch._int_mm` has no fast CPU kernel.
torch.compile does not rescue it: its fused per-token quantize and scale + bias + GELU kernels timed the same as
these eager ops on (2,048, 3,072) inputs (quantize ~30 ms, epilogue ~20 ms), after 59 s of compiling.
Measured again on a VNNI + AMX CPU (`python -m pipeline.model.int8_kernels --repeats 7`, 2026-12-01, "Intel(R)
Xeon(R) Processor" with AVX512-VNNI, AVX512-BF16, AMX-BF16 and AMX-INT8, 2 cores of a shared VM whose AMX
throughput drifted up to 3x between minutes, so only ratios within one run mean anything), GOP/s relative to the
float32 oneDNN fused linear (~130-210 GOP/s there), 2,048 / 4,096 tokens:
  oneDNN int8, per-token activations (this module)            2.50x / 2.70x   (an earlier run: 3.33x / 2.47x)
  oneDNN int8, per-tensor activations, fused GELU / sum       3.48x / 3.08x
  oneDNN int8 matmul alone                                    9.96x / 4.86x   (the kernel's ceiling)
  bf16 oneDNN fused linear (the engine's bf16, dtype auto)    3.28x / 3.75x
So with 8-bit weights int8 beats float32 by 2.5-3.5x per layer, but not bf16 on AMX: the AMX int8 matmul alone is
1.3-3x the bf16 one there, and quantizing every input per token plus the unfused epilogue costs what it saves.
Whole engine (`python -m jobs.benchmark --workloads dl19,long --rounds 2`, same machine and day, jina-base shape,
best of two sweeps; `results/benchmark-cpu-runtimes-amx.md`): int8 16.7 pairs/s on DL19 against bf16 27.2 and
float32 9.5 (attention and LayerNorm stay float32 under int8). int8 is the choice only on CPUs with VNNI and
without bf16 matrix units (AVX512-VNNI Xeons before Sapphire Rapids, AVX-VNNI desktop parts); not measured on one.
Measured on an AVX512-VNNI + AVX512-BF16 CPU without AMX (`python -m pipeline.model.int8_kernels --repeats 3`,
2026-12-08, "AMD EPYC" in /proc/cpuinfo, 2 cores of a shared VM; two runs a minute apart moved by up to 1.5x), GOP/s
relative to the float32 oneDNN fused linear (~420-460 GOP/s there), 512 / 2,048 / 4,096 tokens:
  oneDNN int8, per-token activations (this module)            2.89x / 1.77-2.72x / 1.42x
  oneDNN int8 matmul alone                                    4.17x / 4.18-4.24x / 3.1x
  bf16 oneDNN fused linear (the engine's bf16, dtype auto)    2.00x / 2.03-2.06x / 2.23x
Before the activations went to oneDNN as unsigned (see `ACTIVATION_ZERO_POINT`) the int8 matmul ran oneDNN's
reference kernel on this CPU, at ~0.3 GOP/s: int8 there was three orders of magnitude slower than float32.
What would help next: a static per-tensor activation scale from calibration (batch invariant, and lets oneDNN
fuse bias, GELU and the residual add, and hand int8 straight to the next layer), at the price of clipping inputs
outside the calibrated range. Its fused form alone (the per-tensor row above) only draws level with bf16 on AMX;
the gain would come from int8 flowing between layers, as OpenVINO's static int8 does (29.7 pairs/s on the same
run, at Spearman 0.977 against float32 where bf16 keeps 0.9995), which these eager ops cannot express.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# A few (query, passage) pairs in several scripts: enough to find a checkpoint's outlier channels, which are a
# property of the weights (the same channels light up for any text), not of the data.
CALIBRATION_PAIRS = [
    (
        "what is the capital of germany",
        "Berlin is the capital and largest city of Germany, with 3.7 million people.",
    ),
    (
        "how do vaccines work",
        "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    ),
    (
        "best skincare for sensitive skin",
        "Organic skincare products for sensitive skin contain natural ingredients.",
    ),
    (
        "python sort list of dicts by key",
        "Use sorted(items, key=lambda d: d['name']) to sort dictionaries by a key.",
    ),
    (
        "Hauptstadt von Deutschland",
        "Die Hauptstadt von Deutschland ist Berlin, eine Stadt mit langer Geschichte.",
    ),
    ("capital de España", "La capital de España es Madrid y tiene muchos museos famosos."),
    ("столица России", "Столица России — Москва, крупнейший город страны."),
    ("中国的首都", "中国的首都是北京，一个历史悠久的城市。"),
    ("日本の首都", "日本の首都は東京です。人口が多い都市です。"),
    ("عاصمة مصر", "عاصمة مصر هي القاهرة، وهي مدينة كبيرة."),
    ("भारत की राजधानी", "भारत की राजधानी नई दिल्ली है।"),
    ("SQL singers older than 30", "SELECT name FROM singer WHERE age > 30 ORDER BY name;"),
    ("weather tool schema", '{"name": "get_weather", "parameters": {"city": {"type": "string"}}}'),
    ("quick brown fox", "The quick brown fox jumps over the lazy dog near the river bank."),
    (
        "rerank documents with a cross-encoder",
        "Batch reranking scores every query and candidate document pair with a cross-encoder; " * 6,
    ),
    ("x", "y"),
]


@dataclass(frozen=True)
class Int8Options:
    # SmoothQuant migration strength (0: nothing moves, 1: all of the activation range moves into the weights);
    # None turns smoothing off. 0.5 is the paper's default for BERT/OPT-sized models.
    smooth_alpha: float | None = 0.5
    # Pairs whose activations set the smoothing factors; None: `CALIBRATION_PAIRS`.
    calibration_pairs: tuple[tuple[str, str], ...] | None = None
    # fnmatch patterns of Linear layers kept in float32, named like "layers.3.mlp.fc2", "layers.0.mixer.Wqkv".
    fp32_layers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# The arithmetic.
# ---------------------------------------------------------------------------------------------------------


def quantize_per_channel(
    weight: torch.Tensor, qmax: int = 127
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: weight (out, in) -> (q int8 (out, in), scale float32 (out,)).

    Each row's largest |w| maps to `qmax`; weight ~ q * scale[:, None], within scale / 2 per element.
    """
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / qmax  # (out,)
    q = torch.round(weight / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # (out, in)
    return q, scale


def quantize_per_token(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row (token): x (n, in) float32 -> (q int8 (n, in), scale float32 (n, 1)).

    Each row's largest |x| maps to `qmax`; x ~ q * scale, within scale / 2 per element. A row of zeros gets
    the smallest positive scale and quantizes to zeros.
    """
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())  # (n, 1)
    scale = amax.clamp_min_(torch.finfo(torch.float32).tiny).div_(qmax)  # (n, 1)
    return torch.div(x, scale).round_().to(torch.int8), scale  # |x / scale| <= qmax


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 (rows, cols) * scale ((rows, 1) per token or (rows,) per output channel) -> float32 (rows, cols)."""
    return q.float() * (scale if scale.dim() == 2 else scale[:, None])


def smoothing_factors(input_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s (in,): max|x_j|^alpha / max|W_:j|^(1-alpha), with input_amax (in,) and weight (out, in)."""
    weight_amax = weight.float().abs().amax(dim=0).clamp_min(1e-5)  # (in,)
    return (input_amax.float().clamp_min(1e-5).pow(alpha) / weight_amax.pow(1 - alpha)).clamp_min(
        1e-5
    )


# ---------------------------------------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------------------------------------


# oneDNN's fast int8 matmuls take unsigned activations. Signed ones are handed over as q + 128 (uint8) with a source
# zero point of 128, which oneDNN subtracts back in int32: the same products, exactly. Given int8 activations as
# they are, a CPU with AVX512-VNNI but no AMX (AMD EPYC Zen 4) gets oneDNN's reference kernel (`ref_int8` in
# ONEDNN_VERBOSE): measured 2026-12-08 on a 2-core "AMD EPYC" VM (AVX512-VNNI, no AMX), torch 2.13.0, a
# (2,048 x 768) x (768 x 768) matmul: int8 source 0.3 GOP/s, uint8 + zero point 805 GOP/s (`brg_matmul`),
# float32 ~230 GFLOP/s. A zero point of 0 with the correction subtracted afterwards ran the kernel 2.3x faster
# still, but in float32, where int32 sums above 2^24 are no longer exact: not used.
ACTIVATION_ZERO_POINT = 128


def unsigned_activations(q_x: torch.Tensor) -> torch.Tensor:
    """int8 (n, in) -> uint8 (n, in) holding q_x + 128: flipping the sign bit of two's complement adds 128."""
    return q_x.view(torch.uint8).bitwise_xor(ACTIVATION_ZERO_POINT)


def int8_matmul(
    q_x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor
):
    """(q_x @ q_w^T) * weight_scale: int8 (n, in) x prepacked int8 (in, out) -> float32 (n, out)."""
    return torch.ops.onednn.qlinear_pointwise(
        unsigned_activations(q_x),
        1.0,
        ACTIVATION_ZERO_POINT,
        packed,
        weight_scale,
        zero_points,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


@functools.cache
def int8_kernel_works() -> bool:
    """Whether this torch build runs oneDNN's int8 linear (a tiny probe, once)."""
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        q = torch.ones(4, 8, dtype=torch.int8)
        y = int8_matmul(
            torch.ones(2, 8, dtype=torch.int8),
            ops.qlinear_prepack(q, [2, 8]),
            torch.ones(4),
            torch.zeros(4, dtype=torch.int64),
        )
        return y.shape == (2, 4) and bool((y == 8).all())
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False


@functools.cache
def weight_qmax() -> int:
    """127 where oneDNN's int8 matmul accumulates exactly for full-range weights (VNNI, AMX), else 63.

    The probe multiplies the worst case (every activation 127, every weight 127) and compares with the exact
    sum; AVX2's int16 pair-adds saturate there (see the module docstring).
    """
    k = 64
    y = int8_matmul(
        torch.full((2, k), 127, dtype=torch.int8),
        torch.ops.onednn.qlinear_prepack(torch.full((4, k), 127, dtype=torch.int8), [2, k]),
        torch.ones(4),
        torch.zeros(4, dtype=torch.int64),
    )
    exact = bool((y == k * 127 * 127).all())
    if exact:
        logger.info("int8 weights in [-127, 127]: this CPU's int8 dot products accumulate exactly")
        return 127
    logger.warning(
        "int8 weights in [-63, 63]: without VNNI, 8-bit weights would saturate oneDNN's int16 pair "
        "sums. On such CPUs int8 measured about float32's speed (0.9-1.3x) at lower fidelity: "
        "float32 is the better choice here"
    )
    return 63


class Int8Linear:
    """One Linear layer in int8: weights quantized once (per output channel), activations per token per call.

    weight (out, in), bias (out,) or None, smooth (in,) SmoothQuant factors or None.
    Calling it maps x (n, in) float32 -> (n, out) float32, then GELU (`activation` "none" = erf or "tanh")
    or `+ residual` (n, out), like `modeling.linear`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        smooth: torch.Tensor | None = None,
        qmax: int | None = None,
        batch_size_hint: int = 4096,
    ):
        weight = weight.detach().float()
        if smooth is not None:
            weight = weight * smooth[None, :]
            self.inv_smooth = (1.0 / smooth).float().contiguous()  # (in,)
        else:
            self.inv_smooth = None
        self.qmax = qmax or weight_qmax()
        self.qweight, self.weight_scale = quantize_per_channel(
            weight, self.qmax
        )  # (out, in) int8, (out,)
        self.packed = torch.ops.onednn.qlinear_prepack(
            self.qweight, [batch_size_hint, weight.shape[1]]
        )
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(
        self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        q_x, x_scale = quantize_per_token(x.contiguous())  # (n, in) int8, (n, 1)
        out = int8_matmul(
            q_x, self.packed, self.weight_scale, self.zero_points
        )  # (n, out), still / x_scale
        if residual is not None:
            out = torch.addcmul(residual, out, x_scale, out=out)
            return out if self.bias is None else out.add_(self.bias)
        out = (
            out.mul_(x_scale)
            if self.bias is None
            else torch.addcmul(self.bias, out, x_scale, out=out)
        )
        return out if activation is None else F.gelu(out, approximate=activation)


# ---------------------------------------------------------------------------------------------------------
# The model's Linear layers.
# ---------------------------------------------------------------------------------------------------------


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers that run in int8, by name ("layers.0.mixer.Wqkv" ... "layers.11.mlp.fc2")."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("layers.")
    }


class Int8Weights:
    """What `modeling.linear` asks for with the int8 kernel: per (layer, output rows), an `Int8Linear`, or
    None for a layer kept in float32 (then `fp32` holds oneDNN's packed float32 weights for it).

    Row slices (the last layer computes queries for the first token only) are quantized from the same rows:
    per-channel scales make a slice's int8 weights equal to those rows of the whole layer's.
    """

    def __init__(
        self,
        model: nn.Module,
        options: Int8Options,
        smooth: dict[str, torch.Tensor] | None = None,
        batch_size_hint: int = 4096,
        fp32=None,
    ):
        self.options = options
        self.fp32 = fp32
        self.batch_size_hint = batch_size_hint
        self.names = {id(module): name for name, module in encoder_linears(model).items()}
        self.smooth = smooth or {}
        self.fp32_names = sorted(
            name
            for name in self.names.values()
            if any(fnmatch.fnmatchcase(name, p) for p in options.fp32_layers)
        )
        self.weight_qmax = weight_qmax()
        self._cache: dict[tuple, Int8Linear] = {}
        for _name, module in encoder_linears(
            model
        ).items():  # quantize at load, not on the first batch
            self.get(module, None)

    def get(self, layer: nn.Linear, rows: slice | None) -> Int8Linear | None:
        name = self.names[id(layer)]
        if name in self.fp32_names:
            return None
        key = (name, None if rows is None else (rows.start, rows.stop))
        hit = self._cache.get(key)
        if hit is None:
            weight = layer.weight if rows is None else layer.weight[rows]
            bias = layer.bias if rows is None or layer.bias is None else layer.bias[rows]
            hit = Int8Linear(
                weight, bias, self.smooth.get(name), self.weight_qmax, self.batch_size_hint
            )
            self._cache[key] = hit
        return hit

    def describe(self) -> dict:
        """What a job's summary records about the int8 layers."""
        return {
            "activations": "per token, dynamic",
            "weights": "per output channel",
            "weight_qmax": self.weight_qmax,
            "smooth_alpha": self.options.smooth_alpha if self.smooth else None,
            "fp32_layers": self.fp32_names,
        }


class InputRangeObserver:
    """Stands in for `Int8Weights` while calibrating: computes each Linear in float32 and records the largest
    |x| per input channel, (in,), by layer name."""

    def __init__(self, model: nn.Module):
        self.names = {id(module): name for name, module in encoder_linears(model).items()}
        self.input_amax: dict[str, torch.Tensor] = {}

    def get(self, layer: nn.Linear, rows: slice | None):
        name = self.names[id(layer)]

        def observe(x, activation=None, residual=None):
            amax = x.detach().abs().amax(dim=0).float()  # (in,)
            seen = self.input_amax.get(name)
            self.input_amax[name] = amax if seen is None else torch.maximum(seen, amax)
            out = F.linear(
                x,
                layer.weight if rows is None else layer.weight[rows],
                layer.bias if rows is None or layer.bias is None else layer.bias[rows],
            )
            if activation is not None:
                out = F.gelu(out, approximate=activation)
            return out if residual is None else out + residual

        return observe


def smoothing_for(
    model: nn.Module, input_amax: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors (in,) per Linear layer name, from the observed input ranges."""
    linears = encoder_linears(model)
    return {
        name: smoothing_factors(amax, linears[name].weight.detach(), alpha)
        for name, amax in input_amax.items()
    }
