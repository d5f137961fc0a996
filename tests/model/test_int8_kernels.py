"""The int8-vs-float kernel comparison (`python -m pipeline.model.int8_kernels`): every contender computes the same
layer, and the report names every contender with a positive rate. Its figures are measurements, never asserted."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.model import int8_kernels
from pipeline.model.cross_encoder import cpu_has_bf16_matrix_units
from pipeline.model.modeling import PackedWeights
from pipeline.model.quantization import int8_kernel_works, weight_qmax

pytestmark = pytest.mark.skipif(
    not int8_kernel_works(), reason="this torch build lacks oneDNN's int8 linear"
)


@pytest.mark.parametrize("name", list(int8_kernels.SHAPES))
def test_every_contender_computes_the_same_layer(name):
    """Up to its precision: a contender fed the wrong weights, epilogue or scale would be off by O(1). Four
    tokens: where oneDNN's int8 matmul runs its reference kernel its time grows with them (~10 s a layer at 64)."""
    torch.manual_seed(0)
    d_in, d_out, post = int8_kernels.SHAPES[name]
    case = int8_kernels.Case(4, d_in, d_out, post, weight_qmax())
    fp32 = int8_kernels.fp32_onednn(case, PackedWeights(4))
    expected = int8_kernels.epilogue(case, case.layer(case.x).detach())
    scale = expected.abs().max()
    assert (fp32 - expected).abs().max() / scale < 1e-4
    for run in (
        int8_kernels.int8_per_token,
        int8_kernels.int8_per_token_smooth,
        int8_kernels.fbgemm_dynamic,
    ):
        assert (run(case) - expected).abs().max() / scale < 0.05, run.__name__
    bf16 = int8_kernels.bf16_onednn(case, PackedWeights(4)).float()
    assert (bf16 - expected).abs().max() / scale < 0.05


def test_the_report_names_every_contender_with_a_rate(capsys):
    # One token: on CPUs where oneDNN's int8 matmul falls back to its reference kernel (AVX512-VNNI without AMX)
    # a pass over the layers takes ~45 s at 64 tokens, and its time grows with the tokens.
    int8_kernels.main(
        ["--tokens", "1", "--repeats", "1", "--int-mm-tokens", "0", "--min-seconds", "0.01"]
    )
    out = capsys.readouterr().out
    rates = dict(
        re.findall(r"^\s+(\S.*?\S)\s+(\S+) GOP/s", out, flags=re.M)
    )  # nan or inf too: then it fails
    assert "fp32 oneDNN fused linear (the engine's float32)" in rates
    assert "oneDNN int8, per-token activations (the engine's int8)" in rates
    has_bf16 = any(name.startswith("bf16 oneDNN fused linear") for name in rates)
    assert (
        has_bf16 == cpu_has_bf16_matrix_units()
    )  # bf16 is compared only where dtype auto would pick it
    assert all(float(rate) > 0 for rate in rates.values())


def test_a_rate_is_never_rounded_to_zero_nor_timed_below_the_clock():
    assert [int8_kernels.format_rate(r) for r in (0.0214, 0.0004, 56.71, 1234.4)] == [
        "0.0214",
        "0.0004",
        "56.7",
        "1234",
    ]
    calls = []
    seconds = int8_kernels.timed(
        lambda case: calls.append(case), {"a": 1, "b": 2}, min_seconds=0.02
    )
    # A pass of two no-op calls lasts microseconds: it is repeated until the total reaches the minimum.
    assert len(calls) % 2 == 0 and len(calls) > 20
    assert 0 < seconds * (len(calls) // 2) >= 0.02
