"""float8 (e4m3) Linear layers: quantization bounds, row slices, batch independence, the engine end to end.

torch runs `_scaled_mm` on CPU as a reference, so everything here but the speed is checked on CPU; the speed
against bf16 is measured by scripts/gpu_check.py on a GPU with float8 tensor cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from pipeline.model import CrossEncoder
from pipeline.model.fp8 import E4M3_MAX, Fp8Linear, Fp8Weights, fp8_kernel_works, quantize_rows
from pipeline.model.modeling import SCALED_MM_FP8

PAIRS = [
    ("what is a cross-encoder", "a model that reads the query and the document together"),
    ("capital of france", "paris is the capital of france"),
    ("capital of france", "bananas are rich in potassium"),
    ("how do tides work", "the moon's gravity pulls the oceans, giving two tides a day"),
    ("how do tides work", "tidal locking keeps one face of the moon toward the earth"),
] * 4


def test_rows_quantize_within_e4m3_precision():
    torch.manual_seed(0)
    x = torch.randn(37, 96) * torch.logspace(
        -3, 2, 96
    )  # channels of very different ranges, as activations have
    x[5] = 0.0  # an all-zero row keeps a usable scale
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37, 1) and scale[5].item() == 1.0
    assert torch.all(
        q.float().abs().amax(dim=1)[torch.arange(37) != 5] == E4M3_MAX
    )  # each row's max hits 448
    error = (q.float() * scale - x).abs()
    # 3 mantissa bits: a normal value is off by at most 1/16 of itself; below e4m3's smallest normal (2^-6),
    # by half its subnormal step (2^-10) in the row's scale.
    assert torch.all(error <= torch.maximum(x.abs() / 16, scale * 2.0**-10) + 1e-12)


def test_a_row_slice_quantizes_to_those_rows_of_the_whole_layer():
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 192)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].Wqkv = layer
    weights = Fp8Weights(model)
    whole, kv = weights.get(layer, None), weights.get(layer, slice(64, 192))
    assert torch.equal(whole.q_weight_t.float()[:, 64:], kv.q_weight_t.float())
    assert torch.equal(whole.weight_scale[:, 64:], kv.weight_scale)
    assert weights.get(layer, None) is whole  # quantized once


@pytest.mark.parametrize("n", [1, 15, 16, 33])
def test_a_token_is_scored_the_same_alone_or_packed_with_others(n):
    torch.manual_seed(2)
    layer = torch.nn.Linear(64, 128)
    fp8 = Fp8Linear(layer.weight.detach(), layer.bias.detach())
    x = torch.randn(n, 64)
    batch = fp8(x, activation="none")
    assert batch.shape == (n, 128)  # any token count: only K and N must be multiples of 16
    alone = torch.cat([fp8(x[i : i + 1], activation="none") for i in range(n)])
    assert torch.allclose(batch, alone, rtol=0, atol=1e-6)
    exact = F.gelu(layer(x))
    # Two e4m3 roundings (1/16 each at worst) per product: well within 25% of the output's spread.
    assert (batch - exact).abs().max() < 0.25 * exact.std()
    residual = torch.randn(n, 128)
    assert torch.allclose(fp8(x, residual=residual), fp8(x) + residual, atol=1e-6)


def test_bf16_rows_quantize_without_a_float32_copy_and_within_e4m3_precision():
    torch.manual_seed(3)
    x = (torch.randn(9, 64) * torch.logspace(-2, 2, 64)).to(torch.bfloat16)
    q, scale = quantize_rows(x)
    # The scale x was divided by in bf16 is exactly the one returned (it is a bf16 value).
    assert scale.dtype == torch.float32 and torch.equal(scale.to(torch.bfloat16).float(), scale)
    error = (q.float() * scale - x.float()).abs()
    # e4m3's 1/16, plus bf16's rounding of the quotient (2^-8) before the cast.
    assert torch.all(
        error <= torch.maximum(x.float().abs() * (1 / 16 + 2**-8), scale * 2.0**-9) + 1e-12
    )


@pytest.mark.parametrize("n", [1, 15, 33])
def test_fp8_linear_meets_cudas_scaled_mm_contract(monkeypatch, n):
    """In bf16, as on a GPU: row-major activations, column-major weights, (n, 1) and (1, out) float32 scales,
    bf16 output and bias, no padding of the token count (the stand-in raises otherwise)."""
    import cuda_standins

    cuda_standins.install(monkeypatch)
    torch.manual_seed(4)
    layer = torch.nn.Linear(64, 128).to(torch.bfloat16)
    fp8 = Fp8Linear(layer.weight.detach(), layer.bias.detach())
    x = torch.randn(n, 64, dtype=torch.bfloat16)
    residual = torch.randn(n, 128, dtype=torch.bfloat16)
    out = fp8(x, residual=residual)
    assert (
        out.dtype == torch.bfloat16
        and out.shape == (n, 128)
        and cuda_standins.CALLS["_scaled_mm"] == 1
    )
    exact = layer(x).float() + residual.float()
    assert (out.float() - exact).abs().max() < 0.25 * exact.std()
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.randn(24, 64), None)


def test_the_engine_scores_in_float8_close_to_float32():
    assert fp8_kernel_works(torch.device("cpu"))
    reference = CrossEncoder.from_pretrained("dummy:tiny", device="cpu", dtype="float32")
    fp8 = CrossEncoder.from_pretrained("dummy:tiny", device="cpu", dtype="float8")
    info = fp8.describe()
    assert info["dtype"] == "float8_e4m3fn" and info["linear_kernel"] == SCALED_MM_FP8
    assert info["float8"]["layers"] == 4 * fp8.model.config.num_hidden_layers
    assert (
        fp8.model.emb_ln.weight.dtype == torch.float32
    )  # only the Linear layers are float8 on CPU
    x = np.asarray(reference.compute_score(PAIRS, return_logits=True))
    y = np.asarray(fp8.compute_score(PAIRS, return_logits=True))
    assert not np.array_equal(x, y)  # the float8 kernel really ran
    assert spearmanr(x, y).correlation > 0.8
    assert np.abs(x - y).max() < 0.5 * (x.max() - x.min())
