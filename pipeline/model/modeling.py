"""The cross-encoder, inference only, on packed (unpadded) sequences.

One file, top to bottom: config -> attention backends -> embeddings -> layer -> encoder -> head.
It covers the three checkpoint families we load (see `checkpoint.py`): jina-reranker-v2 (XLM-RoBERTa in
flash-attention's layout), stock XLM-RoBERTa sequence classification (bge-reranker-v2-m3) and BERT
sequence classification (cross-encoder/ms-marco-MiniLM-L6-v2). They share one post-norm transformer;
they differ only in the position offset, token types and where the head's first dense layer comes from.

Packed inputs (the vocabulary of flash-attention's `bert_padding.py`):
    input_ids       (total_tokens,)  int64   every real token of every sequence, back to back
    token_type_ids  (total_tokens,)  int64   or None (all zeros)
    cu_seqlens      (batch + 1,)     int32   sequence b spans [cu_seqlens[b], cu_seqlens[b+1])
    max_seqlen      int                      longest sequence in the batch
No padding token ever enters a Linear, LayerNorm or GELU: they all run on (total_tokens, hidden).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 250002
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1026
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    # RoBERTa numbers positions from padding_idx + 1 (fairseq heritage); BERT from 0.
    position_offset: int = 2
    hidden_act: str = "gelu"  # "gelu" (erf) or "gelu_tanh"
    num_labels: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the position table can number."""
        return self.max_position_embeddings - self.position_offset


# ---------------------------------------------------------------------------------------------------------
# Attention backends. Chosen in exactly one place (`select_attention_backend`) and logged once per choice.
# ---------------------------------------------------------------------------------------------------------

FLASH_ATTN = "flash_attn_varlen"    # the flash-attn package's varlen kernel (CUDA, fp16/bf16)
TORCH_VARLEN = "torch_varlen_attn"  # torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16, no extra package)
SDPA_GROUPED = "sdpa_length_grouped"  # SDPA over length-grouped sub-batches (any device, any dtype)

_logged_choices: set[tuple] = set()


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def select_attention_backend(device: torch.device, dtype: torch.dtype, prefer: str | None = None) -> str:
    """Pick the fastest exact kernel available for (device, dtype); log the choice and why, once.

    Every backend computes the same softmax(QK^T / sqrt(d)) V per sequence; they differ only in float
    rounding (checked by the parity tests), so the choice never changes results beyond tolerance.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if prefer is not None:
        choice, why = prefer, "requested"
    elif device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        choice, why = FLASH_ATTN, "CUDA, half precision and the flash-attn package is installed"
    elif device.type == "cuda" and half and _torch_varlen_attn() is not None:
        choice, why = TORCH_VARLEN, "CUDA, half precision, this torch has varlen_attn (flash-attn not installed)"
    else:
        choice = SDPA_GROUPED
        why = (f"{device.type} with {str(dtype).replace('torch.', '')}: no varlen kernel here; SDPA runs on "
               "sub-batches of similar length, so padding touches attention only, never the Linear layers")
    key = (choice, device.type, dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("attention backend: %s (%s)", choice, why)
    return choice


def _length_groups(seqlens: list[int], min_fill: float = 0.8) -> list[list[int]]:
    """Sequence indices grouped so that every length in a group is >= min_fill * the group's longest.

    Attention cost of a group is len(group) * max_len^2, so this bounds the padded-attention waste at
    about 1 / min_fill^2 whatever order the caller packed sequences in. Length-sorted micro-batches (what
    the scorer sends) usually form a single group.
    """
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and seqlens[i] >= min_fill * seqlens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _sdpa_grouped(q, k, v, cu_seqlens, seqlens, cls_only, scale):
    """Exact attention per sequence with torch SDPA over length-grouped, padded sub-batches.

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `cls_only`;
    k, v: (total_tokens, heads, head_dim). Returns q's shape.
    """
    device = k.device
    out = torch.empty_like(q)
    starts = cu_seqlens[:-1].tolist()
    for group in _length_groups(seqlens):
        lengths = torch.tensor([seqlens[i] for i in group], device=device)
        max_len = int(lengths.max())
        offsets = torch.arange(max_len, device=device)
        start = torch.tensor([starts[i] for i in group], device=device)
        valid = offsets[None, :] < lengths[:, None]                                # (g, max_len)
        # Pad by repeating each sequence's last token: the mask hides it as a key, and padded query rows
        # are dropped below, so its value never matters.
        gather = start[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)  # (g, max_len)
        k_pad = k[gather].transpose(1, 2)                                          # (g, heads, max_len, head_dim)
        v_pad = v[gather].transpose(1, 2)
        mask = None if bool(valid.all()) else valid[:, None, None, :]              # (g, 1, 1, max_len)
        if not cls_only:
            q_pad = q[gather].transpose(1, 2)                                      # (g, heads, max_len, head_dim)
            o = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=mask, scale=scale)
            out[gather[valid]] = o.transpose(1, 2)[valid]
        else:
            rows = torch.tensor(group, device=device)
            q_one = q[rows][:, :, None, :]                                         # (g, heads, 1, head_dim)
            o = F.scaled_dot_product_attention(q_one, k_pad, v_pad, attn_mask=mask, scale=scale)
            out[rows] = o[:, :, 0, :]
    return out


def varlen_attention(backend, q, k, v, cu_seqlens, max_seqlen, seqlens, cls_only: bool, scale: float):
    """softmax(q k^T * scale) v within each packed sequence.

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `cls_only` (one query per
    sequence, its first token); k, v: (total_tokens, heads, head_dim). Returns q's shape.
    """
    if backend == SDPA_GROUPED:
        return _sdpa_grouped(q, k, v, cu_seqlens, seqlens, cls_only, scale)
    batch = cu_seqlens.numel() - 1
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) if cls_only else cu_seqlens
    max_q = 1 if cls_only else max_seqlen
    if backend == FLASH_ATTN:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_q, cu_seqlens, max_q, max_seqlen, softmax_scale=scale)
    if backend == TORCH_VARLEN:
        varlen_attn = _torch_varlen_attn()
        return varlen_attn(q, k, v, cu_q, cu_seqlens, max_q, max_seqlen, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}")


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids, position_ids, token_type_ids):
        """(total_tokens,) ids -> (total_tokens, hidden)."""
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            return hidden + self.token_type_embeddings.weight[0]
        return hidden + self.token_type_embeddings(token_type_ids)


class SelfAttention(nn.Module):
    """The checkpoint names follow flash-attention's MHA: fused `Wqkv` (q, k, v rows in that order), `out_proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden, packed: "_PackedView", cls_only: bool):
        qkv = self.Wqkv(hidden).view(-1, 3, self.num_heads, self.head_dim)   # (total_tokens, 3, heads, head_dim)
        q, k, v = qkv.unbind(dim=1)                                          # each (total_tokens, heads, head_dim)
        if cls_only:
            q = q[packed.cls_index]                                          # (batch, heads, head_dim)
        attn = varlen_attention(packed.backend, q, k, v, packed.cu_seqlens, packed.max_seqlen,
                                packed.seqlens, cls_only, 1.0 / math.sqrt(self.head_dim))
        return self.out_proj(attn.reshape(attn.shape[0], -1))                # (total_q, hidden)


class Mlp(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, hidden):
        return self.fc2(F.gelu(self.fc1(hidden), approximate=self.approximate))


class Layer(nn.Module):
    """Post-norm transformer layer (BERT/RoBERTa): x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mixer = SelfAttention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden, packed: "_PackedView", cls_only: bool = False):
        """(total_tokens, hidden) -> (total_tokens, hidden), or (batch, hidden) when `cls_only`."""
        residual = hidden[packed.cls_index] if cls_only else hidden
        hidden = self.norm1(residual + self.mixer(hidden, packed, cls_only))
        return self.norm2(hidden + self.mlp(hidden))


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the first token (<s> / [CLS]). BERT's pooler is this `dense`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_hidden):
        return self.out_proj(torch.tanh(self.dense(cls_hidden)))


@dataclass
class _PackedView:
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    max_seqlen: int
    seqlens: list[int]
    cls_index: torch.Tensor   # (batch,) int64, = cu_seqlens[:-1]
    backend: str


def packed_position_ids(cu_seqlens: torch.Tensor, total_tokens: int, offset: int) -> torch.Tensor:
    """Positions restart at `offset` for every packed sequence: (total_tokens,) int64.

    e.g. cu_seqlens [0, 3, 5], offset 2 -> [2, 3, 4, 2, 3] (RoBERTa counts from padding_idx + 1).
    """
    starts = cu_seqlens[:-1].long()
    seqlens = cu_seqlens[1:].long() - starts
    token_index = torch.arange(total_tokens, device=cu_seqlens.device)
    return token_index - torch.repeat_interleave(starts, seqlens) + offset


class CrossEncoderModel(nn.Module):
    """Encoder + classification head. `forward` maps a packed batch to (batch,) float32 logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.head = ClassificationHead(config)
        self.attention_backend: str | None = None

    @torch.inference_mode()
    def forward(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None):
        """input_ids (total_tokens,), cu_seqlens (batch+1,) int32 -> logits (batch,) float32."""
        if max_seqlen > self.config.max_tokens_per_sequence:
            raise ValueError(f"a sequence of {max_seqlen} tokens exceeds the model's "
                             f"{self.config.max_tokens_per_sequence}-token limit; truncate it first")
        param = self.emb_ln.weight
        backend = self.attention_backend or select_attention_backend(param.device, param.dtype)
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        packed = _PackedView(cu_seqlens, max_seqlen, seqlens, cu_seqlens[:-1].long(), backend)

        position_ids = packed_position_ids(cu_seqlens, input_ids.numel(), self.config.position_offset)
        hidden = self.emb_ln(self.embeddings(input_ids, position_ids, token_type_ids))  # (total_tokens, hidden)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, packed)
        # Only the first token feeds the head, so the last layer computes queries, the MLP and the norms
        # for that token alone (flash-attention's `last_layer_subset`): about 1/num_layers less work.
        cls_hidden = self.layers[-1](hidden, packed, cls_only=True)                   # (batch, hidden)
        # The head is kept in float32 (see `CrossEncoder`): it is tiny, and raw logits are the product.
        return self.head(cls_hidden.to(self.head.dense.weight.dtype))[:, 0].float()
