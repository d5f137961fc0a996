"""transformers' own classes as the reference our models are compared with, and the inputs of that comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

BATCH = 16


def sample_pairs(dl19_pairs: list[tuple[str, str]], seed: int, count: int) -> list[tuple[str, str]]:
    """`count` real pairs picked at random, then three that test the edges: a document cut by truncation,
    a near-empty pair, and a long query with a long document."""
    rng = np.random.default_rng(seed)
    picked = [dl19_pairs[i] for i in rng.choice(len(dl19_pairs), count, replace=False)]
    return picked + [
        (picked[0][0], picked[1][1] * 8),
        ("a", "b"),
        (picked[2][1] * 3, picked[3][1] * 3),
    ]


def reference_logits(model, tokenizer, pairs, max_length: int, dtype=torch.float32) -> np.ndarray:
    """transformers' first logit per pair, (len(pairs),) float32, computed in `dtype` (the model is put
    back in float32 afterwards), in padded batches of 16."""
    model = model.to(dtype)
    out = []
    for i in range(0, len(pairs), BATCH):
        batch = tokenizer(
            [q for q, _ in pairs[i : i + BATCH]],
            [d for _, d in pairs[i : i + BATCH]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out.append(model(**batch).logits[:, 0].float().numpy())
    model.float()
    return np.concatenate(out)


def checkpoint_logits(directory: str, pairs, max_length: int, dtype=torch.float32) -> np.ndarray:
    """`reference_logits` of the checkpoint in `directory`, loaded by transformers' Auto classes."""
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    return reference_logits(
        model, AutoTokenizer.from_pretrained(directory), pairs, max_length, dtype
    )


def unit_vectors_made_random(directory: str) -> None:
    """Norm weights start as ones and biases as zeros: made random, so that a wrong rename among them (final
    norm vs the head's, say) changes the logits instead of swapping equal vectors."""
    path = Path(directory) / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    state = load_file(path)
    for name, tensor in state.items():
        if tensor.dim() == 1:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            state[name] = (tensor.float() + 0.2 * noise).to(tensor.dtype)
    save_file(state, path, metadata={"format": "pt"})


def assert_alone_as_packed(encoder, pairs, max_length: int) -> None:
    """Each pair scored alone gets the logit it gets packed among the others: no attention across
    sequences, no position leaking from one to the next."""
    together = np.asarray(encoder.compute_score(pairs, max_length=max_length, return_logits=True))
    alone = np.asarray(
        [encoder.compute_score([p], max_length=max_length, return_logits=True) for p in pairs]
    )
    assert together.std() > 0.05, (
        "logits must differ between pairs for the comparison to mean anything"
    )
    assert np.abs(together - alone).max() <= 1e-5


def assert_float8_ranks_like(fp8, pairs, reference: np.ndarray, max_length: int) -> None:
    """`fp8` (an encoder loaded with dtype="float8") runs every Linear layer in float8 and ranks `pairs`
    as the float32 `reference` logits (len(pairs),) do, within float8's error."""
    assert fp8.describe()["float8"]["layers"] == 4 * fp8.model.config.num_hidden_layers
    got = np.asarray(fp8.compute_score(pairs, max_length=max_length, return_logits=True))
    error = np.abs(got - reference)
    assert np.corrcoef(np.argsort(np.argsort(got)), np.argsort(np.argsort(reference)))[0, 1] > 0.8
    assert 0 < error.max() < 0.5 * (reference.max() - reference.min())


def assert_cuda_paths_score_as_cpu(
    directory: str, pairs, max_length: int, flash_attn, varlen, backend: str, monkeypatch
) -> None:
    """The CUDA attention path named `backend` (flash-attn varlen, torch's varlen attention, or padded SDPA),
    run on CPU tensors with the kernels' stand-ins (cuda_standins.py, `flash_attn`/`varlen` as there): the
    CPU engine's bf16 scores within bf16 rounding, the kernel really called."""
    import cuda_standins

    from pipeline.model import CrossEncoder
    from pipeline.model.modeling import FLASH_ATTN, TORCH_VARLEN

    cpu = CrossEncoder.from_pretrained(directory, device="cpu", dtype="bfloat16")
    reference = np.asarray(cpu.compute_score(pairs, max_length=max_length, return_logits=True))
    cuda_standins.install(monkeypatch, flash_attn=flash_attn, varlen=varlen)
    encoder = CrossEncoder.from_pretrained(directory, device="cuda", dtype="bfloat16")
    assert encoder.model.attention_backend == backend
    got = np.asarray(encoder.compute_score(pairs, max_length=max_length, return_logits=True))
    spread = reference.max() - reference.min()
    assert spread > 0.1 and np.abs(got - reference).max() < 0.05 * spread
    if backend == FLASH_ATTN:
        assert cuda_standins.CALLS["flash_attn_varlen_func"] > 0
    if backend == TORCH_VARLEN:
        assert cuda_standins.CALLS["varlen_attn"] > 0


def assert_int8_tracks_float32(directory: str, pairs, max_length: int) -> None:
    """dtype int8: every Linear layer of a decoder (named as the encoders') in int8 on CPU (oneDNN), scores
    correlated with float32's; a torch build without oneDNN's int8 linear refuses in one line instead."""
    from pipeline.core.errors import CheckpointError
    from pipeline.model import CrossEncoder
    from pipeline.model.modeling import ONEDNN_INT8

    fp32 = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    expected = np.asarray(fp32.compute_score(pairs, max_length=max_length, return_logits=True))
    try:
        int8 = CrossEncoder.from_pretrained(directory, device="cpu", dtype="int8")
    except CheckpointError as e:
        assert "int8" in str(e)
        return
    assert int8.model.linear_kernel == ONEDNN_INT8 and int8.describe()["int8"]["fp32_layers"] == []
    got = np.asarray(int8.compute_score(pairs, max_length=max_length, return_logits=True))
    assert np.corrcoef(got, expected)[0, 1] > 0.98


def counted_gemm_flops(directory: str, lengths=(37, 64, 90)):
    """torch's FLOP counter over the engine's float32 forward of token rows of `lengths` (F.linear, so every
    GEMM is seen, on real rows only), with flops.py's count for the same rows: (counted GEMM FLOPs, the model's
    Shape, its linear FLOPs, its attention FLOPs)."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import CrossEncoder
    from pipeline.model.flops import Shape, linear_and_attention_flops
    from pipeline.model.modeling import ATEN_LINEAR

    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    ours.model.linear_kernel = ATEN_LINEAR
    ids = [(np.arange(n, dtype=np.int32) % 200) + 10 for n in lengths]
    with FlopCounterMode(display=False) as counter:
        ours.score_tokens(ids)
    counts = counter.get_flop_counts()["Global"]
    gemms = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    with open(f"{directory}/config.json") as f:
        shape = Shape.from_config(json.load(f))
    linear, attention = linear_and_attention_flops(shape, list(lengths))
    return gemms, shape, linear, attention
