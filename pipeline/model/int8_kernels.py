"""Measure the int8 linear kernels this torch offers against the float32 one the engine runs, on this CPU.

    python -m pipeline.model.int8_kernels [--tokens 2048 4096] [--repeats 3]

One jina-base layer's four Linear layers (Wqkv 768 -> 2,304; out_proj 768 -> 768 + residual; fc1 768 -> 3,072
+ GELU; fc2 3,072 -> 768 + residual) on random inputs, each contender with its own quantization and epilogue,
interleaved, best of `--repeats`. Prints GOP/s (2 * tokens * in * out per Linear) and the ratio to float32.
What the numbers decided is written in `quantization.py`.

Each repeat of a contender runs the four layers as many times as it takes to last `--min-seconds`, so a fast
kernel is not timed below the clock's resolution; rates are printed to three significant figures, so a very
slow one is not rounded to 0.0 (on a CPU where oneDNN has no fast kernel for a layout its int8 matmul falls back
to its reference implementation, two orders of magnitude slower than float32).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.cross_encoder import cpu_has_bf16_matrix_units
from pipeline.model.modeling import ONEDNN_FUSED, PackedWeights, linear
from pipeline.model.quantization import (
    ACTIVATION_ZERO_POINT,
    Int8Linear,
    quantize_per_channel,
    unsigned_activations,
    weight_qmax,
)

HIDDEN, INTERMEDIATE = 768, 3072
SHAPES = {
    "Wqkv": (HIDDEN, 3 * HIDDEN, None),
    "out_proj": (HIDDEN, HIDDEN, "add"),
    "fc1": (HIDDEN, INTERMEDIATE, "gelu"),
    "fc2": (INTERMEDIATE, HIDDEN, "add"),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return platform.processor()
    isa = [
        f
        for f in (
            "avx2",
            "avx512f",
            "avx512_vnni",
            "avx_vnni",
            "avx512_bf16",
            "amx_bf16",
            "amx_int8",
        )
        if f in flags
    ]
    return f"{name} ({', '.join(isa)})"


class Case:
    """One Linear layer's inputs and every contender's prepared weights."""

    def __init__(self, tokens: int, d_in: int, d_out: int, post: str | None, qmax: int):
        self.post = post
        self.x = torch.randn(tokens, d_in)
        self.layer = nn.Linear(d_in, d_out)
        self.residual = torch.randn(tokens, d_out) if post == "add" else None
        self.activation = "none" if post == "gelu" else None
        self.int8 = Int8Linear(
            self.layer.weight, self.layer.bias, qmax=qmax, batch_size_hint=tokens
        )
        self.int8_smooth = Int8Linear(
            self.layer.weight, self.layer.bias, torch.rand(d_in) + 0.5, qmax, tokens
        )
        # Unsigned, as oneDNN's fast kernels take them (quantization.unsigned_activations).
        self.q_x = unsigned_activations(torch.randint(-127, 128, (tokens, d_in), dtype=torch.int8))
        # The engine's bf16 path on the same layer (what `dtype: auto` runs where the CPU has bf16 units).
        self.x_bf16 = self.x.bfloat16()
        self.layer_bf16 = copy.deepcopy(self.layer).bfloat16()
        self.residual_bf16 = None if self.residual is None else self.residual.bfloat16()
        self.qweight_t = self.int8.qweight.t().contiguous()  # (in, out) for torch._int_mm
        with warnings.catch_warnings(record=True) as self.fbgemm_warnings:
            warnings.simplefilter("always")
            q, scale = quantize_per_channel(self.layer.weight.detach(), qmax)
            qw = torch.quantize_per_channel(
                q.float() * scale[:, None],
                scale.double(),
                torch.zeros_like(scale, dtype=torch.int64),
                0,
                torch.qint8,
            )
            self.fbgemm = torch.ops.quantized.linear_prepack(qw, self.layer.bias.detach())


def epilogue(case: Case, out: torch.Tensor) -> torch.Tensor:
    if case.post == "gelu":
        return F.gelu(out)
    return out.add_(case.residual) if case.post == "add" else out


def fp32_onednn(case: Case, packed: PackedWeights):
    return linear(ONEDNN_FUSED, case.x, case.layer, case.activation, case.residual, packed=packed)


def bf16_onednn(case: Case, packed: PackedWeights):
    return linear(
        ONEDNN_FUSED,
        case.x_bf16,
        case.layer_bf16,
        case.activation,
        case.residual_bf16,
        packed=packed,
    )


def int8_per_token(case: Case):
    return case.int8(case.x, case.activation, case.residual)


def int8_per_token_smooth(case: Case):
    return case.int8_smooth(case.x, case.activation, case.residual)


def int8_per_tensor_fused(case: Case):
    """Per-tensor scale (not batch invariant), with oneDNN's own GELU / sum post-ops."""
    lo, hi = torch.aminmax(case.x)
    scale = max(float(hi), -float(lo)) / 127
    q_x = unsigned_activations(torch.div(case.x, scale).round_().to(torch.int8))
    i8, zero_points = case.int8, case.int8.zero_points
    if case.post == "add":
        return torch.ops.onednn.qlinear_pointwise.binary(
            q_x,
            scale,
            ACTIVATION_ZERO_POINT,
            i8.packed,
            i8.weight_scale,
            zero_points,
            case.residual.clone(),
            i8.bias,
            1.0,
            0,
            torch.float32,
            1.0,
            0,
            "sum",
            1.0,
            "none",
            [],
            "",
        )
    return torch.ops.onednn.qlinear_pointwise(
        q_x,
        scale,
        ACTIVATION_ZERO_POINT,
        i8.packed,
        i8.weight_scale,
        zero_points,
        i8.bias,
        1.0,
        0,
        torch.float32,
        "gelu" if case.post else "none",
        [],
        "none" if case.post else "",
    )


def int8_gemm_only(case: Case):
    """The int8 matmul alone, input already quantized, no epilogue: the kernel's ceiling."""
    i8 = case.int8
    return torch.ops.onednn.qlinear_pointwise(
        case.q_x,
        1.0,
        ACTIVATION_ZERO_POINT,
        i8.packed,
        i8.weight_scale,
        i8.zero_points,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def fbgemm_dynamic(case: Case):
    """quantize_dynamic's kernel: per-tensor dynamic activations, reduce_range for AVX2."""
    return epilogue(case, torch.ops.quantized.linear_dynamic(case.x, case.fbgemm, True))


def int_mm(case: Case):
    from pipeline.model.quantization import quantize_per_token

    q_x, scale = quantize_per_token(case.x)
    out = (
        torch._int_mm(q_x, case.qweight_t).float() * scale * case.int8.weight_scale + case.int8.bias
    )
    return epilogue(case, out)


def timed(run, cases: dict, min_seconds: float) -> float:
    """Seconds per pass over the four layers: passes repeated until together they last `min_seconds` (one pass
    when it alone does), so that a pass shorter than the clock's resolution still gets a real rate."""
    passes, start = 0, time.perf_counter()
    while True:
        for case in cases.values():
            run(case)
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / passes


def format_rate(gops: float) -> str:
    """Three significant figures, never rounded to zero: '1234', '56.7', '0.0214'."""
    return f"{gops:.0f}" if gops >= 1000 else f"{gops:.3g}"


def measure(
    tokens: int, repeats: int, with_int_mm: bool, min_seconds: float = 0.2
) -> dict[str, float]:
    torch.manual_seed(0)
    qmax = weight_qmax()
    cases = {
        name: Case(tokens, d_in, d_out, post, qmax) for name, (d_in, d_out, post) in SHAPES.items()
    }
    packed = PackedWeights(tokens)
    contenders = {
        "fp32 oneDNN fused linear (the engine's float32)": lambda c: fp32_onednn(c, packed),
        "oneDNN int8, per-token activations (the engine's int8)": int8_per_token,
        "  same + SmoothQuant division": int8_per_token_smooth,
        "oneDNN int8, per-tensor activations, fused GELU/sum": int8_per_tensor_fused,
        "oneDNN int8 matmul alone (no quantize, no epilogue)": int8_gemm_only,
        "fbgemm linear_dynamic (quantize_dynamic), per-tensor": fbgemm_dynamic,
    }
    if with_int_mm:
        contenders["torch._int_mm + per-token scales"] = int_mm
    if (
        cpu_has_bf16_matrix_units()
    ):  # elsewhere bf16 is emulated: slower than fp32, and not what auto picks
        packed_bf16 = PackedWeights(tokens)
        contenders["bf16 oneDNN fused linear (the engine's bf16, dtype auto)"] = lambda c: (
            bf16_onednn(c, packed_bf16)
        )
    ops = sum(2 * tokens * d_in * d_out for d_in, d_out, _ in SHAPES.values())
    best = dict.fromkeys(contenders, float("inf"))
    for run in contenders.values():
        for case in cases.values():
            run(case)
    for _ in range(repeats):
        for name, run in contenders.items():
            best[name] = min(best[name], timed(run, cases, min_seconds))
    deprecated = {
        str(w.message).split(".")[0] for case in cases.values() for w in case.fbgemm_warnings
    }
    return {name: ops / seconds / 1e9 for name, seconds in best.items()}, deprecated


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.model.int8_kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--int-mm-tokens",
        type=int,
        default=512,
        help="tokens for torch._int_mm (slow on CPUs without its fast path; 0 skips it)",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.2,
        help="each repeat of a contender runs the layers again until it lasts this long",
    )
    args = parser.parse_args(argv)
    print(
        f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, int8 weights in "
        f"[-{weight_qmax()}, {weight_qmax()}]"
    )
    runs = [(tokens, False) for tokens in args.tokens] + (
        [(args.int_mm_tokens, True)] if args.int_mm_tokens else []
    )
    for tokens, with_int_mm in runs:
        figures, deprecated = measure(tokens, args.repeats, with_int_mm, args.min_seconds)
        fp32 = next(iter(figures.values()))
        print(f"{tokens} tokens, one layer's four Linear layers:")
        for name, gops in figures.items():
            print(f"  {name:58s} {format_rate(gops):>7s} GOP/s  {format_rate(gops / fp32):>6s}x")
        for message in sorted(deprecated):
            print(f"  (preparing fbgemm's weights warned: {message})")


if __name__ == "__main__":
    main()
