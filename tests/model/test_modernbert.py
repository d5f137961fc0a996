"""ModernBERT cross-encoders against transformers' own `ModernBertForSequenceClassification` on the same weights.

The tiny checkpoint's config is set so that every property is exercised by short real pairs: a 16-token local
window (8 tokens on either side) that DL19 passages exceed many times over, two rotary bases far apart, layers
global, local, local, global; variants of the same weights pool by mean, or end on a local layer.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cuda_standins
import numpy as np
import pytest
import torch
from reference import (
    assert_alone_as_packed,
    assert_float8_ranks_like,
    checkpoint_logits,
    sample_pairs,
    unit_vectors_made_random,
)
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

from pipeline.core.errors import CheckpointError
from pipeline.model import CrossEncoder
from pipeline.model.checkpoint import inspect_checkpoint
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint
from pipeline.model.modeling import ATEN_LINEAR, FLASH_ATTN, SDPA_GROUPED, TORCH_VARLEN
from pipeline.model.rope_config import RopeEncoderConfig, modernbert_config

MAX_LENGTH = 256
GLOBAL_THETA, LOCAL_THETA = 10_000.0, 500.0


def _edit_config(directory: str, **changes) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory, corpus) -> dict[str, str]:
    """variant -> checkpoint directory: `cls` (last layer global), `mean`, `local_last` (same weights)."""
    root = tmp_path_factory.mktemp("modernbert")
    arch = replace(ARCHITECTURES["tiny-modernbert"], seed=5)
    base = build_checkpoint(str(root / "cls"), arch, corpus)
    unit_vectors_made_random(base)
    _edit_config(
        base,
        local_attention=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": GLOBAL_THETA},
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_THETA},
        },
    )
    variants = {"cls": base}
    for name, changes in {
        "mean": {"classifier_pooling": "mean"},
        "local_last": {
            "layer_types": [
                "full_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ]
        },
    }.items():
        variants[name] = shutil.copytree(base, root / name)
        _edit_config(variants[name], **changes)
    return {name: str(path) for name, path in variants.items()}


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    return sample_pairs(dl19_pairs, seed=1, count=40)


def _ours(directory, pairs, **kwargs) -> np.ndarray:
    encoder = CrossEncoder.from_pretrained(directory, device="cpu", **kwargs)
    return np.asarray(encoder.compute_score(pairs, max_length=MAX_LENGTH, return_logits=True))


def test_the_checkpoint_is_what_the_tests_need(modernbert, sample):
    encoder = CrossEncoder.from_pretrained(modernbert["cls"], device="cpu", dtype="float32")
    config = encoder.model.config
    assert encoder.layout == "modernbert" and config.pooling == "cls"
    assert config.local_layers == (False, True, True, False) and config.local_window == 8
    assert (config.rope_theta, config.local_rope_theta) == (GLOBAL_THETA, LOCAL_THETA)
    lengths = [len(ids) for ids in encoder.tokenizer.encode_pairs(*zip(*sample), MAX_LENGTH)[0]]
    assert max(lengths) == MAX_LENGTH and np.median(lengths) > 4 * 17, "sequences span many windows"


@pytest.mark.parametrize("variant", ["cls", "mean", "local_last"])
def test_float32_parity(modernbert, sample, variant):
    expected = checkpoint_logits(modernbert[variant], sample, MAX_LENGTH)
    got = _ours(modernbert[variant], sample, dtype="float32")
    assert expected.std() > 0.05, "random logits must differ between pairs to compare anything"
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_bfloat16_within_reference_error(modernbert, sample):
    """bf16 error bound: a few times transformers' own bf16 error against its fp32 output."""
    fp32 = checkpoint_logits(modernbert["cls"], sample, MAX_LENGTH)
    reference_error = np.abs(
        checkpoint_logits(modernbert["cls"], sample, MAX_LENGTH, torch.bfloat16) - fp32
    ).max()
    got = _ours(modernbert["cls"], sample, dtype="bfloat16")
    assert reference_error > 0
    assert np.abs(got - fp32).max() <= 3 * reference_error


@pytest.mark.parametrize("variant", ["cls", "mean"])
def test_a_pair_alone_scores_as_it_does_packed(modernbert, sample, variant):
    encoder = CrossEncoder.from_pretrained(modernbert[variant], device="cpu", dtype="float32")
    assert_alone_as_packed(encoder, sample[:6] + sample[-3:], MAX_LENGTH)


@pytest.mark.slow
def test_int8_ranks_like_float32(modernbert, sample):
    pairs = sample[:13] + sample[-3:]
    reference = _ours(modernbert["cls"], pairs, dtype="float32")
    int8 = CrossEncoder.from_pretrained(modernbert["cls"], device="cpu", dtype="int8")
    assert int8.describe()["linear_kernel"] == "onednn_int8"
    got = np.asarray(int8.compute_score(pairs, max_length=MAX_LENGTH, return_logits=True))
    spread = reference.max() - reference.min()
    error = np.abs(got - reference)
    assert spearmanr(reference, got).statistic > 0.9
    assert 0 < error.max() <= 0.15 * spread and error.mean() <= 0.05 * spread


def test_float8_ranks_like_float32(modernbert, sample):
    """float8 Linear layers (torch._scaled_mm; on CPU as the reference for Hopper GPUs), every one of them."""
    pairs = sample[:13] + sample[-3:]
    reference = _ours(modernbert["cls"], pairs, dtype="float32")
    fp8 = CrossEncoder.from_pretrained(modernbert["cls"], device="cpu", dtype="float8")
    assert_float8_ranks_like(fp8, pairs, reference, MAX_LENGTH)


# --- the CUDA code paths, on CPU (see cuda_standins.py) ---------------------------------------------------

WINDOWED_CALLS = {"count": 0}


def _windowed(standin):
    """The stand-in kernel, answering `window_size` as flash-attn does (key j visible from query i when
    i - left <= j <= i + right), after the stand-in has checked the real kernel's input contract."""

    @functools.wraps(standin)  # its signature: the engine reads which arguments the kernel takes
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *args, window_size=(-1, -1), **kwargs):
        full = standin(q, k, v, cu_q, cu_k, max_q, max_k, *args, **kwargs)
        if tuple(window_size) == (-1, -1):
            return full
        assert torch.equal(cu_q, cu_k), "a band is only asked for with every token as a query"
        WINDOWED_CALLS["count"] += 1
        left, right = window_size
        scale = kwargs.get("softmax_scale", kwargs.get("scale"))
        out = torch.empty_like(q)
        for b in range(cu_q.numel() - 1):
            s, e = cu_q[b].item(), cu_q[b + 1].item()
            i = torch.arange(e - s)
            mask = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)
            o = torch.nn.functional.scaled_dot_product_attention(
                *(t[s:e].float().transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=scale
            )
            out[s:e] = o.transpose(0, 1).to(q.dtype)
        return out

    return kernel


@pytest.fixture(scope="module")
def cpu_bf16(modernbert, sample) -> np.ndarray:
    return _ours(modernbert["cls"], sample[-10:], dtype="bfloat16")


@pytest.mark.parametrize(
    "flash_attn, varlen, backend",
    [
        ("ok", "current", FLASH_ATTN),
        (None, "current", TORCH_VARLEN),
        (
            None,
            "no_scale",
            TORCH_VARLEN,
        ),  # torch 2.9's varlen_attn: no window_size, local layers on SDPA
        (None, None, SDPA_GROUPED),
    ],
)
def test_each_cuda_backend_scores_like_the_cpu_engine(
    monkeypatch, modernbert, sample, cpu_bf16, flash_attn, varlen, backend
):
    import sys

    import torch.nn.attention.varlen as varlen_module

    cuda_standins.install(monkeypatch, flash_attn=flash_attn, varlen=varlen)
    if flash_attn == "ok":
        flash = sys.modules["flash_attn"]
        monkeypatch.setattr(
            flash, "flash_attn_varlen_func", _windowed(flash.flash_attn_varlen_func)
        )
    if varlen == "current":
        monkeypatch.setattr(varlen_module, "varlen_attn", _windowed(varlen_module.varlen_attn))
    WINDOWED_CALLS["count"] = 0
    encoder = CrossEncoder.from_pretrained(modernbert["cls"], device="cuda", dtype="bfloat16")
    got = encoder.compute_score(
        sample[-10:], max_length=MAX_LENGTH, return_logits=True, max_tokens_per_batch=512
    )
    info = encoder.describe()
    assert (info["attention_backend"], info["linear_kernel"]) == (backend, ATEN_LINEAR)
    assert (WINDOWED_CALLS["count"] > 0) == (varlen == "current" or flash_attn == "ok")
    spread = cpu_bf16.max() - cpu_bf16.min()
    assert np.abs(np.asarray(got) - cpu_bf16).max() < 0.05 * spread


# --- loading ----------------------------------------------------------------------------------------------


def test_hub_config_of_transformers_4_reads_as_transformers_5s():
    """ModernBERT checkpoints on the hub carry transformers 4.48's keys; transformers 5 writes others."""
    shape = dict(
        vocab_size=50368,
        hidden_size=768,
        num_hidden_layers=22,
        num_attention_heads=12,
        intermediate_size=1152,
        max_position_embeddings=8192,
    )
    v4 = modernbert_config(
        shape
        | {
            "global_rope_theta": 160000.0,
            "local_rope_theta": 10000.0,
            "global_attn_every_n_layers": 3,
            "local_attention": 128,
            "classifier_pooling": "mean",
        }
    )
    v5 = modernbert_config(
        shape
        | {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "layer_types": [
                "full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)
            ],
            "local_attention": 128,
            "classifier_pooling": "mean",
        }
    )
    assert v4 == v5
    assert v4.local_layers.count(False) == 8 and not v4.local_layers[21] and v4.local_window == 64
    assert v4.max_tokens_per_sequence == 8192


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"classifier_pooling": "max"}, "classifier_pooling"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "yarn"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"num_labels": 3, "id2label": {"0": "a", "1": "b", "2": "c"}}, "3 labels"),
    ],
)
def test_unsupported_settings_are_refused_by_name(changes, named):
    shape = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=96,
    )
    with pytest.raises(CheckpointError, match=named):
        modernbert_config(shape | changes)


def test_strict_loading_names_the_weight(modernbert, tmp_path):
    def edited(name, change):
        directory = shutil.copytree(modernbert["cls"], tmp_path / name)
        state = load_file(directory / "model.safetensors")
        change(state)
        save_file(state, directory / "model.safetensors")
        return str(directory)

    missing = edited("missing", lambda s: s.pop("model.layers.2.attn_norm.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weight.*layers\.2\.norm1\.weight"):
        CrossEncoder.from_pretrained(missing, device="cpu", dtype="float32")
    # Layer 0 has no norm before its attention: a checkpoint that has one is not this model.
    extra = edited(
        "extra",
        lambda s: s.update({"model.layers.0.attn_norm.weight": torch.ones(64)}),
    )
    with pytest.raises(CheckpointError, match=r"unexpected weight.*layers\.0\.norm1\.weight"):
        CrossEncoder.from_pretrained(extra, device="cpu", dtype="float32")
    shape = edited(
        "shape", lambda s: s.update({"model.layers.1.mlp.Wi.weight": torch.zeros(96, 64)})
    )
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.fc1\.weight has shape \(96, 64\)"):
        CrossEncoder.from_pretrained(shape, device="cpu", dtype="float32")


def test_a_pickle_checkpoint_is_sized_from_its_config_alone(modernbert, tmp_path):
    """The driver bounds max_length before any scorer unpickles the weights: by ModernBERT's own config."""
    directory = shutil.copytree(modernbert["cls"], tmp_path / "pickle")
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    layout, config = inspect_checkpoint(str(directory), allow_pickle=True)
    assert layout is None and isinstance(config, RopeEncoderConfig)
    assert config.max_tokens_per_sequence == 8192 and config.local_window == 8
    encoder = CrossEncoder.from_pretrained(
        str(directory), device="cpu", dtype="float32", allow_pickle=True
    )
    assert encoder.layout == "modernbert"
