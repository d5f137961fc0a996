"""Packed batches and token-budget micro-batches (text-embeddings-inference's batching, in Python).

A micro-batch is cut by a *token* budget over length-sorted sequences, not by a row count: 64 short
passages and 8 long documents cost the same, and nothing is padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBatch:
    """Sequences laid back to back.

    input_ids       (total_tokens,)  int64
    token_type_ids  (total_tokens,)  int64, or None when the model has a single token type
    cu_seqlens      (batch + 1,)     int32
    max_seqlen      int
    seqlens         list[int]        (batch,) on the host, so the model never reads cu_seqlens back from a GPU
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    token_type_ids: torch.Tensor | None = None
    seqlens: list[int] | None = None

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.max_seqlen,
            None
            if self.token_type_ids is None
            else self.token_type_ids.to(device, non_blocking=True),
            self.seqlens,
        )


def pack(
    input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray] | None = None
) -> PackedBatch:
    """Concatenate token id arrays (each (seqlen,)) into one PackedBatch."""
    if len(input_ids) == 0:
        raise ValueError("cannot pack an empty batch")
    lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
    if (lengths == 0).any():
        raise ValueError(
            "cannot pack an empty sequence (every pair has at least its special tokens)"
        )
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    flat = torch.from_numpy(np.concatenate(input_ids).astype(np.int64, copy=False))
    types = None
    if token_type_ids is not None:
        types = torch.from_numpy(np.concatenate(token_type_ids).astype(np.int64, copy=False))
    return PackedBatch(
        flat, torch.from_numpy(cu_seqlens), int(lengths.max()), types, lengths.tolist()
    )


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray, max_tokens: int, max_sequences: int | None = None
) -> list[np.ndarray]:
    """Split sequences into micro-batches of at most `max_tokens` tokens (and `max_sequences` rows).

    Sequences are taken longest first, so each micro-batch holds similar lengths (attention, the only
    padded part on CPU, stays tight) and the first, heaviest batch shows at once if memory is short.
    Returns index arrays into `lengths`; together they hold every index exactly once. A sequence longer
    than the budget gets a micro-batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, tokens = 0, 0
    for pos, idx in enumerate(order):
        rows = pos - start
        if rows and (
            tokens + lengths[idx] > max_tokens or (max_sequences and rows >= max_sequences)
        ):
            batches.append(order[start:pos])
            start, tokens = pos, 0
        tokens += int(lengths[idx])
    if start < len(order):
        batches.append(order[start:])
    return batches
