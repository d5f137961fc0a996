"""GTE cross-encoders (gte-multilingual-reranker-base's architecture) against transformers' own
`GteForSequenceClassification` on the same weights: as transformers saves them (the hub's names: fused qkv_proj,
up_gate_proj with the up projection first) and as its classes hold them in memory (separate projections)."""

from __future__ import annotations

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
from transformers import AutoModelForSequenceClassification

from pipeline.core.errors import CheckpointError
from pipeline.model import CrossEncoder
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint
from pipeline.model.modeling import ATEN_LINEAR, FLASH_ATTN, SDPA_GROUPED, TORCH_VARLEN
from pipeline.model.rope_config import gte_config

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def gte(tmp_path_factory, corpus) -> dict[str, str]:
    """`saved`: as transformers writes it (rotary base 1,000: positions turn the keys a lot); `in_memory`: the
    same weights under the names of transformers' classes, as a state dict saved without conversion holds them."""
    root = tmp_path_factory.mktemp("gte")
    arch = replace(ARCHITECTURES["tiny-gte"], seed=6)
    saved = build_checkpoint(str(root / "saved"), arch, corpus)
    unit_vectors_made_random(saved)
    config_path = Path(saved) / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000.0}
    config_path.write_text(json.dumps(config, indent=2))
    in_memory = shutil.copytree(saved, root / "in_memory")
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    names = sorted(model.state_dict())
    assert (
        "gte.layers.0.mlp.gate_proj.weight" in names
        and "gte.layers.0.self_attn.q_proj.weight" in names
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        in_memory / "model.safetensors",
    )
    return {"saved": saved, "in_memory": str(in_memory)}


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    return sample_pairs(dl19_pairs, seed=2, count=40)


def _ours(directory, pairs, **kwargs) -> np.ndarray:
    encoder = CrossEncoder.from_pretrained(directory, device="cpu", **kwargs)
    assert encoder.layout == "gte"
    return np.asarray(encoder.compute_score(pairs, max_length=MAX_LENGTH, return_logits=True))


@pytest.fixture(scope="module")
def expected(gte, sample) -> np.ndarray:
    return checkpoint_logits(gte["saved"], sample, MAX_LENGTH)


def test_saved_names_are_the_hubs(gte):
    names = set(load_file(Path(gte["saved"]) / "model.safetensors"))
    assert "gte.encoder.layer.0.attention.qkv_proj.weight" in names
    assert "gte.encoder.layer.0.mlp.up_gate_proj.weight" in names


@pytest.mark.parametrize("names", ["saved", "in_memory"])
def test_float32_parity(gte, sample, expected, names):
    got = _ours(gte[names], sample, dtype="float32")
    assert expected.std() > 0.05, "random logits must differ between pairs to compare anything"
    assert np.abs(got - expected).max() <= 1e-4


def test_bfloat16_within_reference_error(gte, sample, expected):
    reference_error = np.abs(
        checkpoint_logits(gte["saved"], sample, MAX_LENGTH, torch.bfloat16) - expected
    ).max()
    got = _ours(gte["saved"], sample, dtype="bfloat16")
    assert reference_error > 0
    assert np.abs(got - expected).max() <= 3 * reference_error


def test_a_pair_alone_scores_as_it_does_packed(gte, sample):
    encoder = CrossEncoder.from_pretrained(gte["saved"], device="cpu", dtype="float32")
    assert_alone_as_packed(encoder, sample[:6] + sample[-3:], MAX_LENGTH)


def test_int8_ranks_like_float32(gte, sample, expected):
    pairs = sample[:13] + sample[-3:]
    reference = expected[list(range(13)) + [-3, -2, -1]]
    int8 = CrossEncoder.from_pretrained(gte["saved"], device="cpu", dtype="int8")
    assert int8.describe()["linear_kernel"] == "onednn_int8"
    got = np.asarray(int8.compute_score(pairs, max_length=MAX_LENGTH, return_logits=True))
    spread = reference.max() - reference.min()
    error = np.abs(got - reference)
    assert np.corrcoef(np.argsort(np.argsort(got)), np.argsort(np.argsort(reference)))[0, 1] > 0.9
    assert 0 < error.max() <= 0.15 * spread and error.mean() <= 0.05 * spread


def test_float8_ranks_like_float32(gte, sample, expected):
    """float8 Linear layers (torch._scaled_mm; on CPU as the reference for Hopper GPUs), every one of them."""
    pairs = sample[:13] + sample[-3:]
    reference = expected[list(range(13)) + [-3, -2, -1]]
    fp8 = CrossEncoder.from_pretrained(gte["saved"], device="cpu", dtype="float8")
    assert_float8_ranks_like(fp8, pairs, reference, MAX_LENGTH)


@pytest.mark.parametrize(
    "flash_attn, varlen, backend",
    [("ok", "current", FLASH_ATTN), (None, "current", TORCH_VARLEN), (None, None, SDPA_GROUPED)],
)
def test_each_cuda_backend_scores_like_the_cpu_engine(
    monkeypatch, gte, sample, flash_attn, varlen, backend
):
    pairs = sample[-10:]
    cpu = _ours(gte["saved"], pairs, dtype="bfloat16")
    cuda_standins.install(monkeypatch, flash_attn=flash_attn, varlen=varlen)
    encoder = CrossEncoder.from_pretrained(gte["saved"], device="cuda", dtype="bfloat16")
    got = encoder.compute_score(
        pairs, max_length=MAX_LENGTH, return_logits=True, max_tokens_per_batch=512
    )
    info = encoder.describe()
    assert (info["attention_backend"], info["linear_kernel"]) == (backend, ATEN_LINEAR)
    assert np.abs(np.asarray(got) - cpu).max() < 0.05 * (cpu.max() - cpu.min())


def test_rope_scaling_is_refused_by_name():
    shape = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    assert gte_config(shape | {"rope_theta": 20000.0}).rope_theta == 20000.0
    assert gte_config(shape).rope_theta == 160000.0  # transformers' default for GTE
    with pytest.raises(CheckpointError, match="'ntk'"):
        gte_config(shape | {"rope_scaling": {"type": "ntk", "factor": 8.0}})


def test_strict_loading_names_the_weight(gte, tmp_path):
    directory = shutil.copytree(gte["in_memory"], tmp_path / "no_gate")
    state = load_file(directory / "model.safetensors")
    state.pop("gte.layers.1.mlp.gate_proj.weight")
    save_file(state, directory / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"lacks layers\.1\.mlp\.gate\.weight .*fuse mlp\.up, mlp\.gate"
    ):
        CrossEncoder.from_pretrained(str(directory), device="cpu", dtype="float32")
