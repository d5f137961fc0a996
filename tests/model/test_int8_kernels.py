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

pytestmark = pytest.mark.skipif(not int8_kernel_works(), reason="this torch build lacks oneDNN's int8 linear")


@pytest.mark.parametrize("name", list(int8_kernels.SHAPES))
def test_every_contender_computes_the_same_layer(name):
    """Up to its precision: a contender fed the wrong weights, epilogue or scale would be off by O(1)."""
    torch.manual_seed(0)
    d_in, d_out, post = int8_kernels.SHAPES[name]
    case = int8_kernels.Case(64, d_in, d_out, post, weight_qmax())
    fp32 = int8_kernels.fp32_onednn(case, PackedWeights(64))
    expected = int8_kernels.epilogue(case, case.layer(case.x).detach())
    scale = expected.abs().max()
    assert (fp32 - expected).abs().max() / scale < 1e-4
    for run in (int8_kernels.int8_per_token, int8_kernels.int8_per_token_smooth, int8_kernels.fbgemm_dynamic):
        assert (run(case) - expected).abs().max() / scale < 0.05, run.__name__
    bf16 = int8_kernels.bf16_onednn(case, PackedWeights(64)).float()
    assert (bf16 - expected).abs().max() / scale < 0.05


def test_the_report_names_every_contender_with_a_rate(capsys):
    int8_kernels.main(["--tokens", "64", "--repeats", "1", "--int-mm-tokens", "0"])
    out = capsys.readouterr().out
    rates = dict(re.findall(r"^\s+(\S.*?\S)\s+(\S+) GOP/s", out, flags=re.M))  # nan or inf too: then it fails
    assert "fp32 oneDNN fused linear (the engine's float32)" in rates
    assert "oneDNN int8, per-token activations (the engine's int8)" in rates
    has_bf16 = any(name.startswith("bf16 oneDNN fused linear") for name in rates)
    assert has_bf16 == cpu_has_bf16_matrix_units()  # bf16 is compared only where dtype auto would pick it
    assert all(float(rate) > 0 for rate in rates.values())
