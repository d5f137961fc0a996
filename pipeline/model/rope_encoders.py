"""ModernBERT and GTE cross-encoders, inference only, on packed (unpadded) sequences.

Same packed inputs and outputs as `modeling.CrossEncoderModel` (input_ids (total_tokens,), cu_seqlens (batch + 1,)
int32, max_seqlen -> (batch,) float32 logits), the same attention backends and Linear kernels (`modeling.linear`,
so int8 and the fused oneDNN kernels apply). What differs, per family (`rope_config.RopeEncoderConfig`):

- Positions are rotary (RoPE, `rotate_half` convention, computed in float32), restarting at 0 in every packed
  sequence; no position table. ModernBERT has two bases: `rope_theta` for its global layers, `local_rope_theta`
  for its local ones.
- ModernBERT's local layers attend within a band: token i of a sequence sees tokens j of the *same* sequence with
  |i - j| <= local_window (64 for the 128-token window). Flash-attn's and torch's varlen kernels take that as
  `window_size=(w, w)`; SDPA takes a band mask per run of equal lengths.
- The MLP is gated: fc2(act(a) * b) with a, b the two halves of fc1 (ModernBERT's `Wi`; GTE's gate_proj and
  up_proj stacked at load).
- ModernBERT is pre-norm (no norm before layer 0's attention, a final norm after the last layer), without
  biases; GTE is post-norm like BERT, with biases on attention.
- Pooling: GTE and CLS-pooled ModernBERT read the first token (the last layer computes only its query and MLP
  when that layer attends globally); mean-pooled ModernBERT averages each sequence's tokens.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import device as runtime
from pipeline.model.modeling import (
    FLASH_ATTN,
    GEMM_ROWS_MULTIPLE,
    ONEDNN_FUSED,
    TORCH_VARLEN,
    ClassificationHead,
    PackedView,
    equal_length_runs,
    flash_attn_varlen,
    linear,
    pack_view,
    packed_position_ids,
    pad_rows,
    padded_groups,
    torch_varlen_attn,
    varlen_attention,
    varlen_options,
    varlen_takes_scale,
)
from pipeline.model.rope_config import RopeEncoderConfig

_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


# ---------------------------------------------------------------------------------------------------------
# Rotary positions.
# ---------------------------------------------------------------------------------------------------------


def rotary_tables(
    positions: torch.Tensor, theta: float, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of each token's rotation: positions (n,) int64 -> two (n, head_dim) float32.

    The inverse frequencies are computed on the host in float32, as transformers computes them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]  # (n, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, heads, head_dim) rotated by (n, head_dim) tables, in float32, returned in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Banded (local) attention over packed sequences.
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _varlen_takes_window(varlen_attn) -> bool:
    """torch's varlen_attn has `window_size` from 2.10 on; 2.9's has none."""
    return "window_size" in inspect.signature(varlen_attn).parameters


@functools.lru_cache(maxsize=64)
def _band(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: True where |i - j| <= window (key j visible from query i)."""
    index = torch.arange(n, device=device)
    return (index[:, None] - index[None, :]).abs() <= window


def _sdpa_banded_runs(q, k, v, packed: PackedView, window: int, scale: float) -> torch.Tensor:
    """Banded attention with SDPA on zero-copy views of each run of equal-length sequences (CPU)."""
    out = torch.empty_like(q)
    starts, seqlens = packed.starts, packed.seqlens
    heads, head_dim = k.shape[1], k.shape[2]
    out[starts[-1] + seqlens[-1] :] = 0  # rows past the last sequence (GEMM_ROWS_MULTIPLE)
    for first, last in equal_length_runs(seqlens):
        m, n, start = last - first, seqlens[first], starts[first]
        end = start + m * n
        q_run, k_run, v_run = (
            t[start:end].view(m, n, heads, head_dim).transpose(1, 2) for t in (q, k, v)
        )  # each (m, heads, n, head_dim)
        mask = _band(n, window, q.device) if n > window + 1 else None
        o = F.scaled_dot_product_attention(q_run, k_run, v_run, attn_mask=mask, scale=scale)
        out[start:end].view(m, n, heads, head_dim).copy_(o.transpose(1, 2))
    return out


def _sdpa_banded_padded(q, k, v, packed: PackedView, window: int, scale: float) -> torch.Tensor:
    """Banded attention with SDPA over padded length groups (CUDA without a windowed varlen kernel)."""
    if packed.padded_groups is None:
        packed.padded_groups = padded_groups(packed.starts, packed.seqlens, k.device)
    out = torch.empty_like(q)
    heads, head_dim = k.shape[1], k.shape[2]
    for group in packed.padded_groups:
        max_len = group.gather.shape[1]
        mask = _band(max_len, window, q.device)[None, None]  # (1, 1, max_len, max_len)
        if group.mask is not None:
            mask = mask & group.mask
        q_pad, k_pad, v_pad = (t[group.gather].transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=mask, scale=scale)
        out[group.tokens] = o.transpose(1, 2).reshape(-1, heads, head_dim)[group.slots]
    return out


def banded_attention(backend: str, q, k, v, packed: PackedView, window: int, scale: float):
    """softmax(q k^T * scale) v within each packed sequence, token i seeing only tokens j with |i - j| <= window.

    q, k, v: (total_tokens, heads, head_dim) -> (total_tokens, heads, head_dim).
    """
    if packed.max_seqlen <= window + 1:  # the band covers every sequence whole
        return varlen_attention(backend, q, k, v, packed, False, scale)
    cu, max_len = packed.cu_seqlens, packed.max_seqlen
    if backend == FLASH_ATTN:
        return flash_attn_varlen()(
            q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, window_size=(window, window)
        )
    if backend == TORCH_VARLEN:
        fn = torch_varlen_attn()
        if _varlen_takes_window(fn) and varlen_takes_scale(fn):
            return fn(
                q,
                k,
                v,
                cu,
                cu,
                max_len,
                max_len,
                scale=scale,
                window_size=(window, window),
                **varlen_options(fn),
            )
    if not runtime.is_cuda(k.device):
        return _sdpa_banded_runs(q, k, v, packed, window, scale)
    return _sdpa_banded_padded(q, k, v, packed, window, scale)


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


def _layer_norm(config: RopeEncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)


class RopeEmbeddings(nn.Module):
    def __init__(self, config: RopeEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # GTE adds token type 0 (or the pair's types); ModernBERT has none.
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if config.family == "gte" and config.type_vocab_size
            else None
        )

    def forward(self, input_ids, token_type_ids):
        """(total_tokens,) ids -> (total_tokens, hidden)."""
        hidden = self.word_embeddings(input_ids)
        if self.token_type_embeddings is None:
            return hidden
        if token_type_ids is None:
            return hidden + self.token_type_embeddings.weight[0]
        return hidden + self.token_type_embeddings(token_type_ids)


class RopeSelfAttention(nn.Module):
    """Fused `Wqkv` (q, k, v rows), rotary q and k, global or banded attention, `out_proj`."""

    def __init__(self, config: RopeEncoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(
        self, hidden, packed: PackedView, rotary, window: int | None, cls_only: bool, residual
    ):
        """out_proj(attention) + residual: (rows, hidden) -> (rows, hidden), or (batch, hidden) when `cls_only`.

        rotary: (cos, sin), each (rows, head_dim) float32. `cls_only` (global layers only): keys and values of
        every token, the query of each sequence's first token.
        """
        heads, head_dim, width = self.num_heads, self.head_dim, self.num_heads * self.head_dim
        kernel, weights = packed.linear_kernel, packed.weights
        cos, sin = rotary
        if cls_only:
            kv = linear(kernel, hidden, self.Wqkv, rows=slice(width, 3 * width), packed=weights)
            k, v = kv.view(-1, 2, heads, head_dim).unbind(dim=1)
            q = linear(
                kernel, hidden[packed.cls_index], self.Wqkv, rows=slice(0, width), packed=weights
            ).view(-1, heads, head_dim)
            q = apply_rotary(q, cos[packed.cls_index], sin[packed.cls_index])
        else:
            qkv = linear(kernel, hidden, self.Wqkv, packed=weights).view(-1, 3, heads, head_dim)
            q, k, v = qkv.unbind(dim=1)  # each (rows, heads, head_dim)
            q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        scale = 1.0 / math.sqrt(head_dim)
        if window is None:
            attn = varlen_attention(packed.backend, q, k, v.contiguous(), packed, cls_only, scale)
        else:
            attn = banded_attention(packed.backend, q, k, v.contiguous(), packed, window, scale)
        return linear(
            kernel,
            attn.reshape(attn.shape[0], -1),
            self.out_proj,
            residual=residual,
            packed=weights,
        )


class GatedMlp(nn.Module):
    """fc2(act(a) * b), a and b the two halves of fc1's output (GeGLU; GTE's fc1 has b's rows first)."""

    def __init__(self, config: RopeEncoderConfig):
        super().__init__()
        bias = config.mlp_bias
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        # GTE's down_proj has a bias even where its gate and up projections have none.
        self.fc2 = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=bias or config.family == "gte"
        )
        self.approximate = _GELU[config.hidden_act]
        self.activate_first_half = config.activate_first_half

    def forward(self, hidden, kernel: str, residual, packed):
        """(tokens, hidden) -> (tokens, hidden), plus `residual`."""
        a, b = linear(kernel, hidden, self.fc1, packed=packed).chunk(2, dim=-1)
        if not self.activate_first_half:
            a, b = b, a
        inner = F.gelu(a, approximate=self.approximate) * b
        return linear(kernel, inner, self.fc2, residual=residual, packed=packed)


class RopeLayer(nn.Module):
    """ModernBERT (pre-norm): x += attn(norm1(x)); x += mlp(norm2(x)); layer 0 has no norm1.
    GTE (post-norm): x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: RopeEncoderConfig, index: int):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.norm1 = None if (config.pre_norm and index == 0) else _layer_norm(config)
        self.mixer = RopeSelfAttention(config)
        self.norm2 = _layer_norm(config)
        self.mlp = GatedMlp(config)
        self.local = bool(config.local_layers[index]) if config.local_layers else False
        self.window = config.local_window if self.local else None

    def forward(self, hidden, packed: PackedView, rotary, cls_only: bool = False):
        """(rows, hidden) -> (rows, hidden), or (batch, hidden) when `cls_only`."""
        residual = hidden[packed.cls_index] if cls_only else hidden
        kernel, weights = packed.linear_kernel, packed.weights
        if self.pre_norm:
            attn_in = hidden if self.norm1 is None else self.norm1(hidden)
            hidden = self.mixer(attn_in, packed, rotary, self.window, cls_only, residual)
            return self.mlp(self.norm2(hidden), kernel, residual=hidden, packed=weights)
        hidden = self.norm1(self.mixer(hidden, packed, rotary, self.window, cls_only, residual))
        return self.norm2(self.mlp(hidden, kernel, residual=hidden, packed=weights))


class ModernBertHead(nn.Module):
    """dense -> act -> norm -> out_proj (ModernBERT's `head` and `classifier`)."""

    def __init__(self, config: RopeEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.norm = _layer_norm(config)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.approximate = _GELU[config.head_act]

    def forward(self, pooled):
        return self.out_proj(self.norm(F.gelu(self.dense(pooled), approximate=self.approximate)))


class RopeCrossEncoderModel(nn.Module):
    """Encoder + head for the rotary families. `forward` maps a packed batch to (batch,) float32 logits."""

    def __init__(self, config: RopeEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = RopeEmbeddings(config)
        self.emb_ln = _layer_norm(config)
        self.layers = nn.ModuleList(RopeLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _layer_norm(config) if config.pre_norm else None
        self.head = (
            ModernBertHead(config) if config.family == "modernbert" else ClassificationHead(config)
        )
        self.attention_backend: str | None = None
        self.linear_kernel: str | None = None
        self.packed_weights = None  # set by `CrossEncoder`, as for `CrossEncoderModel`

    def _rotary(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """local? -> (cos, sin) tables for the layer kinds this model has."""
        config = self.config
        kinds = {layer.local for layer in self.layers}
        return {
            local: rotary_tables(
                positions, config.local_rope_theta if local else config.rope_theta, config.head_dim
            )
            for local in kinds
        }

    @torch.inference_mode()
    def forward(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen: int,
        token_type_ids=None,
        seqlens: list[int] | None = None,
    ):
        """input_ids (total_tokens,), cu_seqlens (batch+1,) int32 -> logits (batch,) float32."""
        packed = pack_view(
            self, self.emb_ln.weight, cu_seqlens, max_seqlen, seqlens, cu_seqlens[:-1].long()
        )
        kernel = packed.linear_kernel
        total = input_ids.numel()
        hidden = self.emb_ln(self.embeddings(input_ids, token_type_ids))  # (total_tokens, hidden)
        positions = packed_position_ids(cu_seqlens, total, 0)
        if kernel == ONEDNN_FUSED:
            hidden = pad_rows(hidden, GEMM_ROWS_MULTIPLE)
            positions = F.pad(positions, (0, hidden.shape[0] - total))
        rotary = self._rotary(positions)
        last = self.layers[-1]
        # CLS pooling reads one token: a global last layer computes its query and MLP for that token alone.
        cls_only = self.config.pooling == "cls" and not last.local
        for layer in self.layers[:-1] if cls_only else self.layers:
            hidden = layer(hidden, packed, rotary[layer.local])
        if cls_only:
            hidden = last(hidden, packed, rotary[last.local], cls_only=True)  # (batch, hidden)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if cls_only:
            pooled = hidden
        elif self.config.pooling == "cls":
            pooled = hidden[packed.cls_index]
        else:
            pooled = self._mean(hidden[:total], packed, seqlens)
        # The head is kept in float32 (see `CrossEncoder`).
        return self.head(pooled.to(self.head.dense.weight.dtype))[:, 0].float()

    @staticmethod
    def _mean(hidden, packed: PackedView, seqlens: list[int]) -> torch.Tensor:
        """Mean of each sequence's rows: (total_tokens, hidden) -> (batch, hidden) float32."""
        batch = len(seqlens)
        lengths = torch.tensor(seqlens, dtype=torch.float32).to(hidden.device, non_blocking=True)
        owner = torch.repeat_interleave(
            torch.arange(batch, device=hidden.device),
            packed.cu_seqlens[1:].long() - packed.cls_index,
            output_size=hidden.shape[0],
        )
        sums = torch.zeros(batch, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, owner, hidden.float()) / lengths[:, None]


# Layouts whose model is `RopeCrossEncoderModel` (see `checkpoint.LAYOUTS`).
ROPE_MODELS = {"modernbert": RopeCrossEncoderModel, "gte": RopeCrossEncoderModel}
