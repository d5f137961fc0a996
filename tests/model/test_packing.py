"""Packed batches: positions restart per sequence, token budgets hold, a pair scores the same in any batch."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model import CrossEncoder, pack, token_budget_batches
from pipeline.model.modeling import _length_groups, packed_position_ids


def test_position_ids_restart_per_sequence_with_roberta_offset():
    cu_seqlens = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert packed_position_ids(cu_seqlens, 9, offset=2).tolist() == [2, 3, 4, 2, 3, 2, 3, 4, 5]
    assert packed_position_ids(cu_seqlens, 9, offset=0).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_pack_builds_cu_seqlens():
    batch = pack([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])])
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert batch.max_seqlen == 3


def test_token_budget_batches_cover_every_index_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=500)
    batches = token_budget_batches(lengths, max_tokens=1024, max_sequences=40)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 40
        assert lengths[b].sum() <= 1024 or len(b) == 1
    # Longest first: each batch's lengths are no longer than the previous batch's shortest.
    for prev, nxt in zip(batches, batches[1:]):
        assert lengths[prev].min() >= lengths[nxt].max()
    # A sequence longer than the budget gets a batch of its own.
    assert [len(b) for b in token_budget_batches([5000, 10, 10], max_tokens=1000)] == [1, 2]


def test_length_groups_bound_padding():
    lengths = [100, 12, 95, 13, 50, 81, 100]
    groups = _length_groups(lengths, min_fill=0.8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert min(lengths[i] for i in g) >= 0.8 * max(lengths[i] for i in g)


def test_pair_alone_equals_pair_in_mixed_batch(checkpoints, dl19_pairs):
    """Batch invariance: same logit alone, inside a mixed-length pack, and under another token budget."""
    for layout in ("jina_flash", "bert"):
        ce = CrossEncoder.from_pretrained(checkpoints[layout], device="cpu", dtype="float32")
        pairs = dl19_pairs[:40] + [("short", "x"), (dl19_pairs[0][0], dl19_pairs[0][1] * 4)]
        together = np.asarray(ce.compute_score(pairs, max_length=256, return_logits=True))
        small_budget = np.asarray(
            ce.compute_score(pairs, max_length=256, return_logits=True, max_tokens_per_batch=300)
        )
        for i in (0, 17, 40, 41):
            alone = ce.compute_score([pairs[i]], max_length=256, return_logits=True)
            assert abs(alone - together[i]) <= 1e-5
        assert np.abs(together - small_budget).max() <= 1e-5
        assert len(set(np.round(together, 4))) > 10  # the pairs really score differently


def test_gemm_rows_are_rounded_up_with_zero_rows_that_change_no_score(
    checkpoints, dl19_pairs, monkeypatch
):
    """The packed token rows go through the GEMMs in multiples of GEMM_ROWS_MULTIPLE (few shapes, so few
    oneDNN primitives); the rows added are zeros past the last sequence and change no score."""
    from pipeline.model import modeling

    hidden = torch.randn(130, 8)
    padded = modeling.pad_rows(hidden, 64)
    assert padded.shape == (192, 8) and torch.equal(padded[:130], hidden) and not padded[130:].any()
    assert modeling.pad_rows(hidden[:128], 64).shape == (128, 8)  # already a multiple: unchanged

    ce = CrossEncoder.from_pretrained(checkpoints["jina_flash"], device="cpu", dtype="float32")
    rows = []  # the rows the first layer's attention block gets, per micro-batch
    ce.model.layers[0].mixer.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[0])
    )
    pairs = dl19_pairs[:23]
    rounded = np.asarray(ce.compute_score(pairs, max_length=256, return_logits=True))
    monkeypatch.setattr(modeling, "GEMM_ROWS_MULTIPLE", 1)
    exact = np.asarray(ce.compute_score(pairs, max_length=256, return_logits=True))
    assert np.abs(rounded - exact).max() <= 1e-5 and len(set(np.round(exact, 4))) > 5
    tokens = sum(
        len(ids)
        for ids in ce.tokenizer.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], 256)[0]
    )
    fused = (
        modeling.select_linear_kernel(torch.device("cpu"), torch.float32) == modeling.ONEDNN_FUSED
    )
    # One micro-batch each time: rounded up to a multiple of 64 with oneDNN's fused GEMMs, then exact.
    assert rows == [-(-tokens // 64) * 64 if fused else tokens, tokens]
