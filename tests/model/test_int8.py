"""dtype int8: int8 Linear layers (weights per output channel, activations per token) in the packed engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.core.cli import base_parser
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model import CrossEncoder, resolve_dtype
from pipeline.model.modeling import ONEDNN_INT8
from pipeline.model.quantization import (
    ACTIVATION_ZERO_POINT,
    Int8Linear,
    Int8Options,
    dequantize,
    int8_matmul,
    quantize_per_channel,
    quantize_per_token,
    unsigned_activations,
    weight_qmax,
)
from pipeline.rerank.cache import fingerprint
from pipeline.rerank.config import RerankConfig

CPU = torch.device("cpu")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda x: np.argsort(np.argsort(x)).astype(np.float64)  # noqa: E731 (no ties in float logits)
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    rng = np.random.default_rng(7)
    return [dl19_pairs[i] for i in rng.choice(len(dl19_pairs), 64, replace=False)]


def _edited_copy(source: str, target, edit) -> str:
    """A copy of the checkpoint directory `source` whose weights `edit(state)` changed in place."""
    import shutil

    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors")
    return str(target)


@pytest.fixture(scope="module")
def spread_checkpoint(checkpoints, tmp_path_factory):
    """The tiny jina checkpoint with its last projection 4x larger: logits spread over several units (about 7
    on the sample), as a trained reranker's do, so that an error bound relative to the spread means something."""

    def louder_head(state):
        state["classifier.out_proj.weight"] *= 4

    return _edited_copy(
        checkpoints["jina_flash"], tmp_path_factory.mktemp("spread") / "jina", louder_head
    )


@pytest.fixture(scope="module")
def fp32(spread_checkpoint):
    return CrossEncoder.from_pretrained(spread_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def int8(spread_checkpoint):
    return CrossEncoder.from_pretrained(spread_checkpoint, device="cpu", dtype="int8")


# -- the arithmetic ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qmax", [127, 63])
def test_per_channel_scales_map_each_rows_max_to_qmax(qmax):
    weight = (
        torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]
    )  # rows of very different ranges
    q, scale = quantize_per_channel(weight, qmax)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), qmax, dtype=torch.int8))
    assert torch.allclose(scale, weight.abs().amax(dim=1) / qmax, rtol=1e-6)


def test_round_trip_within_half_a_step():
    x = torch.randn(40, 64) * torch.logspace(-2, 2, 40)[:, None]
    x[3] = 0.0  # a silent token
    q, scale = quantize_per_token(x)
    assert scale.shape == (40, 1)
    assert torch.equal(q.abs().amax(dim=1)[[0, 1, 39]], torch.full((3,), 127, dtype=torch.int8))
    assert (dequantize(q, scale) - x).abs().le(scale / 2 * (1 + 1e-5)).all()
    assert torch.equal(q[3], torch.zeros(64, dtype=torch.int8))
    w = torch.randn(16, 64)
    qw, wscale = quantize_per_channel(w, 63)
    assert (dequantize(qw, wscale) - w).abs().le(wscale[:, None] / 2 * (1 + 1e-5)).all()


def _error_bound(x, weight, x_scale, w_scale):
    """|x.w - x^.w^| <= sum_j |w_ij| s_x/2 + |x_j| s_w_i/2 + s_x s_w_i/4, per (token, output)."""
    return (
        x_scale / 2 * weight.abs().sum(dim=1)[None, :]
        + x.abs().sum(dim=1, keepdim=True) * w_scale[None, :] / 2
        + x.shape[1] * x_scale * w_scale[None, :] / 4
    )


@pytest.mark.parametrize("post", [None, "gelu", "residual"])
def test_int8_linear_within_the_bound_its_scales_give(post):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80)
    x = torch.randn(300, 96) * 3
    residual = torch.randn(300, 80)
    got = Int8Linear(layer.weight, layer.bias)(
        x, "none" if post == "gelu" else None, residual if post == "residual" else None
    )
    with torch.no_grad():
        linear = F.linear(x, layer.weight, layer.bias)
    _, x_scale = quantize_per_token(x)
    _, w_scale = quantize_per_channel(layer.weight.detach(), weight_qmax())
    bound = _error_bound(
        x, layer.weight.detach(), x_scale, w_scale
    )  # GELU is 1.13-Lipschitz, the add exact
    expected = {None: linear, "gelu": F.gelu(linear), "residual": linear + residual}[post]
    error = (got - expected).abs()
    assert (error <= 1.13 * bound + 1e-5).all()
    assert error.max() > 0  # it really ran in int8


def test_int8_kernel_computes_exactly_on_the_quantized_values():
    """oneDNN's int8 product equals float math on the dequantized operands: no int16 saturation, even for the
    worst case of full-range weights and activations (what `weight_qmax` guards on CPUs without VNNI)."""
    torch.manual_seed(1)
    weight = torch.randn(64, 256)
    weight[:, 0] = 50.0  # every row's max at +qmax, same sign as x below
    x = torch.randn(8, 256).abs() + 1.0
    x[:, 0] = 50.0  # every token's max at +127
    layer = Int8Linear(weight, None)
    q_x, x_scale = quantize_per_token(x)
    exact = (
        dequantize(q_x, x_scale).double() @ dequantize(layer.qweight, layer.weight_scale).double().T
    )
    assert torch.allclose(layer(x).double(), exact, rtol=1e-5, atol=1e-4)


def test_activations_reach_onednn_unsigned_with_every_value_kept():
    """oneDNN's fast int8 kernels take unsigned activations (signed ones fall back to its reference kernel on some
    CPUs): q + 128 as uint8 with a zero point of 128 gives the int32 products of the signed values, exactly, over
    the whole range of both operands."""
    every = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(unsigned_activations(every).long(), every.long() + ACTIVATION_ZERO_POINT)
    assert unsigned_activations(every).dtype == torch.uint8
    qmax = weight_qmax()
    q_x = every[1:].reshape(3, 85)  # -127..127
    q_w = torch.randint(
        -qmax, qmax + 1, (16, 85), dtype=torch.int8, generator=torch.Generator().manual_seed(3)
    )
    q_w[:, :2] = qmax  # the largest sums the probe allows
    out = int8_matmul(
        q_x,
        torch.ops.onednn.qlinear_prepack(q_w, [3, 85]),
        torch.ones(16),
        torch.zeros(16, dtype=torch.int64),
    )
    assert torch.equal(out.double(), (q_x.double() @ q_w.double().T))


def test_the_int8_matmul_runs_a_jit_kernel_not_onednns_reference_one():
    """What the unsigned activations are for, asked of oneDNN itself (ONEDNN_VERBOSE names the implementation of
    every primitive it runs): the reference kernel is three orders of magnitude slower than float32."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from pipeline.model.quantization import Int8Linear\n"
        "Int8Linear(torch.randn(192, 64), torch.randn(192))(torch.randn(256, 64), 'none')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    matmuls = [line for line in result.stdout.splitlines() if ",exec,cpu,matmul," in line]
    assert matmuls and not any(",ref" in line for line in matmuls), matmuls


def test_smoothing_keeps_the_product():
    """(x / s) @ (W * s)^T is the same product: with smoothing the layer stays within the bound of its own scales."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(50, 64)
    x[:, 5] *= 60  # an outlier channel
    smooth = x.abs().amax(dim=0).sqrt() / layer.weight.detach().abs().amax(dim=0).sqrt()
    got = Int8Linear(layer.weight, layer.bias, smooth)(x)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
    x_smooth, w_smooth = x / smooth, layer.weight.detach() * smooth
    _, x_scale = quantize_per_token(x_smooth)
    _, w_scale = quantize_per_channel(w_smooth, weight_qmax())
    assert (
        (got - expected).abs() <= _error_bound(x_smooth, w_smooth, x_scale, w_scale) + 1e-4
    ).all()
    plain = (Int8Linear(layer.weight, layer.bias)(x) - expected).abs().mean()
    assert (got - expected).abs().mean() < plain  # the outlier hurt less once migrated


# -- the engine --------------------------------------------------------------------------------------------


def test_int8_engine_describes_itself(int8):
    info = int8.describe()
    assert info["dtype"] == "int8" and info["linear_kernel"] == ONEDNN_INT8
    assert info["int8"]["weight_qmax"] == weight_qmax() and info["int8"]["smooth_alpha"] == 0.5
    assert (
        int8.model.emb_ln.weight.dtype == torch.float32
        and int8.model.head.dense.weight.dtype == torch.float32
    )


def test_packed_micro_batch_equals_pairs_one_by_one(int8, sample):
    """Per-token scales: a pair's int8 score does not depend on what it was packed with."""
    pairs = sample[:24]
    together = np.asarray(int8.compute_score(pairs, max_length=256, return_logits=True))
    alone = np.asarray([int8.compute_score([p], max_length=256, return_logits=True) for p in pairs])
    assert together.std() > 0.05
    assert np.abs(together - alone).max() <= 1e-4


def test_int8_ranks_like_float32(fp32, int8, sample):
    reference = np.asarray(fp32.compute_score(sample, max_length=256, return_logits=True))
    got = np.asarray(int8.compute_score(sample, max_length=256, return_logits=True))
    spread = reference.max() - reference.min()
    assert spread > 4.0, (
        "the checkpoint's logits must spread over units for the comparison to mean anything"
    )
    assert _spearman(reference, got) > 0.9
    # Measured in two sessions (the fixture's checkpoint varies a little between them): spread 7.1 / 7.0, max
    # |dlogit| 0.53 / 0.57, mean 0.10 / 0.23; bf16 on the same pairs: max 0.11, mean 0.034. The tiny wide-init
    # random model amplifies rounding more than trained weights do, and this AVX2 CPU gets 7-bit weights.
    error = np.abs(got - reference)
    assert error.max() <= 0.15 * spread and error.mean() <= 0.05 * spread
    assert error.max() > 0


@pytest.fixture(scope="module")
def outlier_checkpoint(checkpoints, tmp_path_factory):
    """The tiny jina checkpoint with two hidden channels 40x louder after every LayerNorm, as BERT-family
    models have (the weights after them shrink those channels back, so float32 logits stay sane)."""

    def outliers(state, channels=(3, 17)):
        for name in list(state):
            if name.endswith(
                (
                    "emb_ln.weight",
                    "emb_ln.bias",
                    "norm1.weight",
                    "norm1.bias",
                    "norm2.weight",
                    "norm2.bias",
                )
            ):
                state[name][list(channels)] *= 40
            if name.endswith(("mixer.Wqkv.weight", "mlp.fc1.weight")):
                state[name][:, list(channels)] /= 40

    return _edited_copy(
        checkpoints["jina_flash"], tmp_path_factory.mktemp("outliers") / "jina", outliers
    )


def test_options_smoothing_and_fp32_layers(outlier_checkpoint, sample):
    pairs = sample[:40]
    reference = np.asarray(
        CrossEncoder.from_pretrained(
            outlier_checkpoint, device="cpu", dtype="float32"
        ).compute_score(pairs, max_length=256, return_logits=True)
    )

    def error(options):
        encoder = CrossEncoder.from_pretrained(
            outlier_checkpoint, device="cpu", dtype="int8", int8=options
        )
        return np.abs(
            np.asarray(encoder.compute_score(pairs, max_length=256, return_logits=True)) - reference
        ).mean()

    naive, smoothed = error(Int8Options(smooth_alpha=None)), error(Int8Options())
    assert smoothed < 0.7 * naive
    # Every layer kept in float32: the float32 engine's scores.
    assert error(Int8Options(smooth_alpha=None, fp32_layers=("layers.*",))) <= 1e-5


# -- dtype as a setting ------------------------------------------------------------------------------------


def test_int8_is_accepted_and_never_the_default():
    assert RerankConfig(dtype="int8").dtype == "int8"
    assert RerankConfig().dtype == "auto" and resolve_dtype("auto", CPU) != torch.int8
    args = base_parser("python -m jobs.rerank", "rerank").parse_args(
        ["--model", "m", "--dtype", "int8"]
    )
    assert args.dtype == "int8"
    assert base_parser("python -m jobs.rerank", "rerank").parse_args(["--model", "m"]).dtype is None
    assert resolve_dtype("int8", CPU) == torch.int8


def test_unknown_dtype_errors_list_int8():
    with pytest.raises(CheckpointError, match=r"unknown dtype 'int4'.*int8.*float8"):
        resolve_dtype("int4", CPU)
    with pytest.raises(ConfigError, match="int8.*float8"):
        base_parser("python -m jobs.rerank", "rerank").parse_args(
            ["--model", "m", "--dtype", "int4"]
        )
    with pytest.raises(Exception, match="int8.*float8"):
        RerankConfig(dtype="int4")


def test_int8_refused_off_cpu_and_options_need_int8(checkpoints):
    with pytest.raises(CheckpointError, match="CPU only"):
        resolve_dtype("int8", torch.device("cuda"))
    with pytest.raises(CheckpointError, match="dtype='int8'"):
        CrossEncoder.from_pretrained(
            checkpoints["jina_flash"], device="cpu", dtype="float32", int8=Int8Options()
        )


def test_score_cache_fingerprint_names_int8():
    """The job puts the configured dtype string (resolved only when auto) into the cache's fingerprint."""
    checkpoint = {"model.safetensors": "abc"}
    settings = lambda dtype: {"dtype": dtype, "device": "cpu", "max_length": 1024, "tokenizer": {}}  # noqa: E731
    names = {
        dtype: fingerprint(checkpoint, settings(RerankConfig(dtype=dtype).dtype))
        for dtype in ("int8", "float32", "bfloat16")
    }
    assert len(set(names.values())) == 3


# -- int8 options as settings of the rerank job ------------------------------------------------------------


def test_linear_layer_names_are_the_engines(checkpoints):
    """The driver checks `int8.fp32_layers` against names built from the layer count alone (no torch there):
    they must be the names the engine matches the patterns against, in every checkpoint layout."""
    from pipeline.model.model_config import linear_layer_names
    from pipeline.model.quantization import encoder_linears

    for layout, directory in checkpoints.items():
        model = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32").model
        assert linear_layer_names(model.config.num_hidden_layers) == list(encoder_linears(model)), (
            layout
        )


def test_int8_section_is_checked_before_any_work():
    from pipeline.core.config import load_config
    from pipeline.rerank.preflight import check_model

    def check(*overrides):
        return check_model(load_config(RerankConfig, None, list(overrides), model="dummy:tiny"))

    for dtype in ("float32", "auto"):
        with pytest.raises(
            ConfigError,
            match=r"^config key `int8.smooth_alpha` tunes dtype int8 only \(dtype is "
            rf"{dtype}\); set dtype: int8, or remove int8\.\*$",
        ):
            check(f"dtype={dtype}", "int8.smooth_alpha=null")
    with pytest.raises(
        ConfigError, match=r"config keys `int8.smooth_alpha`, `int8.fp32_layers` tune dtype int8"
    ):
        check("dtype=bfloat16", "int8.smooth_alpha=0.2", 'int8.fp32_layers=["layers.0.*"]')
    # The defaults written out (as configs/rerank_local.yaml does) are no setting away from them.
    assert (
        check("dtype=float32", "int8.smooth_alpha=0.5", "int8.fp32_layers=[]")["fp32_layers"] == []
    )

    # dummy:tiny has 2 layers: layers.2 is past its last, and `mlp.fc2` lacks the layer prefix.
    with pytest.raises(
        ConfigError,
        match=r"^config key `int8.fp32_layers`: 'layers.2.\*', 'mlp.fc2' match no "
        r"Linear layer of dummy:tiny, whose names are layers.<i>.mixer.Wqkv, .*"
        r"for i in 0..1 \(for example `layers.1.mlp.fc2`",
    ):
        check("dtype=int8", 'int8.fp32_layers=["layers.0.*", "layers.2.*", "mlp.fc2"]')
    with pytest.raises(
        ConfigError, match=r"'layers.0.MLP.fc2' matches no Linear layer"
    ):  # names are case-sensitive
        check("dtype=int8", 'int8.fp32_layers=["layers.0.MLP.fc2"]')
    model = check("dtype=int8", 'int8.fp32_layers=["layers.*.mlp.fc2", "layers.1.mixer.Wqkv"]')
    assert model["fp32_layers"] == ["layers.0.mlp.fc2", "layers.1.mixer.Wqkv", "layers.1.mlp.fc2"]
    with pytest.raises(
        ConfigError,
        match=r"config key `int8.smooth_alpha`: Input should be less than or equal to 1",
    ):
        load_config(RerankConfig, None, ["dtype=int8", "int8.smooth_alpha=1.5"])


def test_int8_section_is_a_result_setting_of_int8_only():
    """A resumed run must match it under int8; other dtypes hash as before the section existed, so their
    unfinished outputs keep resuming."""
    from pipeline.core.config import load_config

    int8 = lambda *o: load_config(RerankConfig, None, ["dtype=int8", *o]).result_settings()  # noqa: E731
    assert int8()["int8"] == {"smooth_alpha": 0.5, "fp32_layers": []}
    assert int8("int8.smooth_alpha=null") != int8()
    assert int8('int8.fp32_layers=["layers.11.*"]')["int8"] == {
        "smooth_alpha": 0.5,
        "fp32_layers": ["layers.11.*"],
    }
    assert "int8" not in RerankConfig(dtype="float32").result_settings()
    assert set(RerankConfig(dtype="float32").result_settings()) == {
        "model",
        "revision",
        "dtype",
        "input",
        "tokenizer",
        "output",
    }


def test_score_cache_fingerprint_follows_int8_options():
    from pipeline.rerank.cache_phases import int8_settings

    checkpoint = {"model.safetensors": "abc"}

    def name(picked=(), **int8):
        """The cache folder of dtype int8 with these options, whose patterns the driver resolved to `picked`."""
        config = RerankConfig(dtype="int8", int8=int8)
        settings = {
            "dtype": "int8",
            "device": "cpu",
            "max_length": 1024,
            "tokenizer": {},
            "int8": int8_settings(config, list(picked), weight_qmax=63, calibration="c0"),
        }
        return fingerprint(checkpoint, settings)

    default = name()
    assert name() == default and name(smooth_alpha=0.5) == default
    assert (
        len({default, name(smooth_alpha=None), name(smooth_alpha=0.8), name(["layers.0.mlp.fc2"])})
        == 4
    )
    # Patterns are recorded as the layers they picked (the driver resolves them): equal layers, equal scores.
    assert name(["layers.0.mlp.fc2"], fp32_layers=["layers.0.mlp.fc2"]) == name(
        ["layers.0.mlp.fc2"], fp32_layers=["layers.*.mlp.fc2"]
    )
    # The default options keep the fingerprint caches had before the options were settings.
    assert int8_settings(RerankConfig(dtype="int8"), [], 63, "c0") == {
        "weight_qmax": 63,
        "smooth_alpha": 0.5,
        "fp32_layers": [],
        "calibration": "c0",
    }


def test_score_stage_builds_the_configured_int8_options(tmp_path):
    from pipeline.rerank.config import Int8Config, ScorerConfig
    from pipeline.rerank.stages.score import ScoreStage

    def info(name, int8):
        ScoreStage(
            "dummy:tiny",
            None,
            "int8",
            ScorerConfig(device="cpu"),
            str(tmp_path / name),
            {},
            int8=int8,
        )
        (path,) = (tmp_path / name).glob("*.json")
        return json.loads(path.read_text())["int8"]

    tuned = info("tuned", Int8Config(smooth_alpha=None, fp32_layers=["layers.0.*"]))
    assert tuned["smooth_alpha"] is None
    assert tuned["fp32_layers"] == [
        "layers.0.mixer.Wqkv",
        "layers.0.mixer.out_proj",
        "layers.0.mlp.fc1",
        "layers.0.mlp.fc2",
    ]
    default = info("default", Int8Config())
    assert default["smooth_alpha"] == 0.5 and default["fp32_layers"] == []
