"""Decoder rerankers (Qwen3-Reranker, Qwen2-based, bge-reranker-v2-gemma), inference only, on packed sequences.

A pre-norm causal transformer read at each sequence's last token (the prompt's end, `templates.py`):

    x = embed(ids) * embed_scale; per layer: x += attn(rmsnorm(x)); x += mlp(rmsnorm(x));
    score = head . rmsnorm(x)[last]

- attention: grouped-query (`num_key_value_heads` < heads; Gemma-2B: one kv head), q/k RMSNorm per head
  (Qwen3) or q/k/v biases (Qwen2), rotary positions that restart at 0 for every packed sequence, causal
  within each sequence;
- MLP: gated, down(act(gate(x)) * up(x)) with act silu (SwiGLU: Qwen) or tanh-approximated GELU (GeGLU:
  Gemma), gate and up fused into one GEMM (`mlp.fc1`, gate rows first);
- RMSNorm: x / rms(x) * weight (Qwen), or * (1 + weight) in float32 (Gemma); Gemma's embeddings are scaled
  by sqrt(hidden_size). These differences are `DecoderConfig` data, not other classes;
- head: one row, `(hidden,) -> ()`. For a causal LM checkpoint it is lm_head[yes] - lm_head[no] (or
  lm_head[yes] alone: bge-reranker-v2-gemma's logit("Yes")), folded at load: the vocabulary projection
  never runs. sigmoid(row . h) is the reference's softmax over the two tokens. A converted "seq-cls"
  checkpoint's 1-row `score` is that row.

Packed inputs as in `modeling.py`: input_ids (total_tokens,), cu_seqlens (batch + 1,) int32, max_seqlen.
Attention backends are `modeling`'s: flash-attn varlen with causal=True, torch's varlen_attn with a causal
window, equal-length causal SDPA runs on CPU (padded length groups on CUDA). The last layer computes one
query per sequence (its last token), which sees every key of its sequence: plain attention, no mask.
The Linear layers are named as the encoders' (`layers.N.mixer.Wqkv`, `.mixer.out_proj`, `.mlp.fc1`, `.mlp.fc2`),
so the linear kernels, int8 and float8 apply unchanged.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.model import device as runtime
from pipeline.model.checkpoint import detect_layout, read_config
from pipeline.model.decoder_config import DecoderConfig, decoder_config_from_json
from pipeline.model.modeling import (
    FLASH_ATTN,
    GEMM_ROWS_MULTIPLE,
    ONEDNN_FUSED,
    SDPA_GROUPED,
    TORCH_VARLEN,
    PackedView,
    equal_length_runs,
    flash_attn_varlen,
    linear,
    pack_view,
    packed_position_ids,
    pad_rows,
    padded_groups,
    torch_varlen_attn,
    varlen_options,
)
from pipeline.model.weights import (
    assign_checked,
    convert_state_dict,
    read_weights,
    warn_if_dummy,
)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), the mean square taken in float32.

    offset 0 (transformers' Qwen3RMSNorm): the normalised x is cast to x's dtype, then scaled there;
    offset 1 (GemmaRMSNorm, whose weights are stored as scale - 1): scaled in float32, then cast."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x):
        """(..., size) -> (..., size) in x's dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin: (tokens, head_dim) in `dtype` for the given positions, computed in float32."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
            / head_dim
        )
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (tokens, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x, cos, sin):
    """Rotary embedding (rotate-half form): x (tokens, heads, head_dim), cos/sin (tokens, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@functools.cache
def _varlen_parameters(varlen_attn) -> frozenset:
    return frozenset(inspect.signature(varlen_attn).parameters)


def _repeat_kv(x, groups: int):
    """(tokens, kv_heads, head_dim) -> (tokens, kv_heads * groups, head_dim), each kv head repeated."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_causal_runs(q, k, v, packed: PackedView, last_only: bool, scale: float):
    """Causal attention per sequence with SDPA on zero-copy views of equal-length runs (CPU).

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `last_only`;
    k, v: (total_tokens, kv_heads, head_dim). Returns q's shape.
    """
    out = torch.empty_like(q)
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], k.shape[2]
    gqa = heads != kv_heads
    starts, seqlens = packed.starts, packed.seqlens
    if not last_only:
        out[starts[-1] + seqlens[-1] :] = 0  # rows past the last sequence (GEMM_ROWS_MULTIPLE)
    for first, last in equal_length_runs(seqlens):
        m, n, start = last - first, seqlens[first], starts[first]
        end = start + m * n
        k_run = k[start:end].view(m, n, kv_heads, head_dim).transpose(1, 2)  # (m, kv_heads, n, d)
        v_run = v[start:end].view(m, n, kv_heads, head_dim).transpose(1, 2)
        if last_only:
            q_run = q[first:last][:, :, None, :]  # (m, heads, 1, d): the last token sees all keys
            o = F.scaled_dot_product_attention(q_run, k_run, v_run, scale=scale, enable_gqa=gqa)
            out[first:last] = o[:, :, 0, :]
        else:
            q_run = q[start:end].view(m, n, heads, head_dim).transpose(1, 2)  # (m, heads, n, d)
            o = F.scaled_dot_product_attention(
                q_run, k_run, v_run, scale=scale, is_causal=True, enable_gqa=gqa
            )
            out[start:end].view(m, n, heads, head_dim).copy_(o.transpose(1, 2))
    return out


def _sdpa_causal_padded(q, k, v, packed: PackedView, last_only: bool, scale: float):
    """Causal attention with SDPA over padded length groups (CUDA without a varlen kernel). Padding sits
    after each sequence's end, so a causal query never sees it; the last-token queries use the key mask."""
    if packed.padded_groups is None:
        packed.padded_groups = padded_groups(packed.starts, packed.seqlens, k.device)
    out = torch.empty_like(q)
    heads, head_dim = q.shape[1], q.shape[2]
    gqa = heads != k.shape[1]
    for group in packed.padded_groups:
        k_pad = k[group.gather].transpose(1, 2)  # (g, kv_heads, max_len, head_dim)
        v_pad = v[group.gather].transpose(1, 2)
        if last_only:
            q_one = q[group.rows][:, :, None, :]  # (g, heads, 1, head_dim)
            o = F.scaled_dot_product_attention(
                q_one, k_pad, v_pad, attn_mask=group.mask, scale=scale, enable_gqa=gqa
            )
            out[group.rows] = o[:, :, 0, :]
        else:
            q_pad = q[group.gather].transpose(1, 2)  # (g, heads, max_len, head_dim)
            o = F.scaled_dot_product_attention(
                q_pad, k_pad, v_pad, is_causal=True, scale=scale, enable_gqa=gqa
            )
            out[group.tokens] = o.transpose(1, 2).reshape(-1, heads, head_dim)[group.slots]
    return out


def causal_attention(backend: str, q, k, v, packed: PackedView, last_only: bool, scale: float):
    """softmax(q k^T * scale) v within each packed sequence, each query seeing its own and earlier tokens.

    q: (total_tokens, heads, head_dim), or (batch, heads, head_dim) when `last_only` (one query per sequence,
    its last token); k, v: (total_tokens, kv_heads, head_dim), heads a multiple of kv_heads. Returns q's shape.
    """
    if backend == SDPA_GROUPED:
        if runtime.is_cuda(k.device):
            return _sdpa_causal_padded(q, k, v, packed, last_only, scale)
        return _sdpa_causal_runs(q, k, v, packed, last_only, scale)
    cu_k, max_k = packed.cu_seqlens, packed.max_seqlen
    if last_only:
        if packed.cu_queries is None:
            packed.cu_queries = torch.arange(
                len(packed.seqlens) + 1, dtype=torch.int32, device=q.device
            )
        cu_q, max_q = packed.cu_queries, 1
    else:
        cu_q, max_q = cu_k, max_k
    causal = not last_only  # a last-token query sees every key of its sequence
    if backend == FLASH_ATTN:  # grouped-query heads natively
        return flash_attn_varlen()(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal
        )
    if backend != TORCH_VARLEN:
        raise ValueError(f"unknown attention backend {backend!r}")
    fn = torch_varlen_attn()
    parameters = _varlen_parameters(fn)
    if "enable_gqa" in parameters:
        kwargs = {"enable_gqa": q.shape[1] != k.shape[1]}
    else:
        groups = q.shape[1] // k.shape[1]
        k, v, kwargs = _repeat_kv(k, groups), _repeat_kv(v, groups), {}
    if "window_size" in parameters:  # (-1, 0): every earlier key, no later one
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "scale" in parameters:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
        raise ValueError(
            "this torch's varlen_attn has no `scale` argument and the model needs a non-default one"
        )
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs, **varlen_options(fn))


class DecoderAttention(nn.Module):
    """Fused `Wqkv` (q rows, then k, then v; kv heads may be fewer), `out_proj` without bias."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.layer_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, packed: PackedView, rope, last_only: bool, residual):
        """out_proj(attention(x)) + residual: x (total_tokens, hidden) -> (total_q, hidden).

        rope: (cos, sin) each (total_tokens, head_dim); `last_only`: queries of the last tokens alone."""
        d, h, kvh = self.head_dim, self.num_heads, self.num_kv_heads
        cos, sin = rope
        kernel, weights = packed.linear_kernel, packed.weights
        if last_only:
            kv = linear(kernel, x, self.Wqkv, rows=slice(h * d, (h + 2 * kvh) * d), packed=weights)
            k, v = kv.view(-1, 2, kvh, d).unbind(dim=1)  # each (total_tokens, kv_heads, d)
            q = linear(
                kernel, x[packed.cls_index], self.Wqkv, rows=slice(0, h * d), packed=weights
            ).view(-1, h, d)  # (batch, heads, d)
            q_cos, q_sin = cos[packed.cls_index], sin[packed.cls_index]
        else:
            qkv = linear(kernel, x, self.Wqkv, packed=weights)
            q = qkv[:, : h * d].view(-1, h, d)
            k, v = qkv[:, h * d :].view(-1, 2, kvh, d).unbind(dim=1)
            q_cos, q_sin = cos, sin
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, q_cos, q_sin), rotate(k, cos, sin)
        attn = causal_attention(
            packed.backend,
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            packed,
            last_only,
            1.0 / math.sqrt(d),
        )
        return linear(
            kernel,
            attn.reshape(attn.shape[0], -1),
            self.out_proj,
            residual=residual,
            packed=weights,
        )


# `DecoderConfig.hidden_act` -> the gate's activation: SwiGLU (Qwen) or GeGLU (Gemma's gelu_pytorch_tanh).
GATE_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """fc2(act(gate) * up), gate and up the two halves of fc1's output (gate first)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.act = GATE_ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, kernel: str, residual, packed=None):
        """(tokens, hidden) -> (tokens, hidden), plus residual."""
        gate_up = linear(kernel, x, self.fc1, packed=packed)
        inner = self.act(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
        return linear(kernel, inner, self.fc2, residual=residual, packed=packed)


class DecoderLayer(nn.Module):
    """Pre-norm: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.layer_norm_eps, config.norm_offset)
        self.mixer = DecoderAttention(config)
        self.norm2 = RMSNorm(config.hidden_size, config.layer_norm_eps, config.norm_offset)
        self.mlp = GatedMLP(config)

    def forward(self, hidden, packed: PackedView, rope, last_only: bool = False):
        """(total_tokens, hidden) -> (total_tokens, hidden), or (batch, hidden) when `last_only`."""
        residual = hidden[packed.cls_index] if last_only else hidden
        hidden = self.mixer(self.norm1(hidden), packed, rope, last_only, residual)
        return self.mlp(
            self.norm2(hidden), packed.linear_kernel, residual=hidden, packed=packed.weights
        )


class DecoderModel(nn.Module):
    """Decoder + one-row score head. `forward` maps a packed batch to (batch,) float32 scores."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_eps, config.norm_offset)
        self.head = nn.Linear(config.hidden_size, 1, bias=False)
        self.attention_backend: str | None = None
        self.linear_kernel: str | None = None
        self.packed_weights = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen: int,
        token_type_ids=None,
        seqlens: list[int] | None = None,
    ):
        """input_ids (total_tokens,), cu_seqlens (batch+1,) int32 -> scores (batch,) float32 (token types unused)."""
        # A decoder answers at each sequence's last token: that is the one the head reads.
        last_index = cu_seqlens[1:].long() - 1
        packed = pack_view(self, self.norm.weight, cu_seqlens, max_seqlen, seqlens, last_index)
        kernel = packed.linear_kernel
        total = input_ids.numel()
        positions = packed_position_ids(cu_seqlens, total, 0)  # restart at 0 per sequence
        hidden = self.embed_tokens(input_ids)  # (total_tokens, hidden)
        if self.config.embed_scale != 1.0:  # Gemma: the scale rounded to the model's dtype first
            hidden = hidden * torch.tensor(self.config.embed_scale, dtype=hidden.dtype)
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        if kernel == ONEDNN_FUSED:
            hidden = pad_rows(hidden, GEMM_ROWS_MULTIPLE)
            rope = tuple(pad_rows(t, GEMM_ROWS_MULTIPLE) for t in rope)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, packed, rope)
        # Only the last token is scored, so the last layer computes its query, MLP and norms alone.
        last = self.norm(self.layers[-1](hidden, packed, rope, last_only=True))  # (batch, hidden)
        return self.head(last.to(self.head.weight.dtype))[:, 0].float()


# Our names -> the checkpoint's, as `checkpoint.LAYOUTS` renames them; the score head's sources.
LM_HEAD, TIED_EMBEDDINGS, SCORE = "lm_head.weight", "embed_tokens.weight", "score.weight"


def fold_decoder_state(
    state: dict[str, torch.Tensor], config: DecoderConfig, answer_ids: tuple[int, int | None] | None
) -> dict[str, torch.Tensor]:
    """Converted checkpoint weights -> `DecoderModel`'s: gate and up fused into `mlp.fc1`, the score head
    folded into one row. `answer_ids`: (yes, no) token ids of the template (no may be None); unused for a
    seq-cls checkpoint, whose `score` row is the head."""
    out = dict(state)
    for gate in [n for n in out if n.endswith(".mlp.gate.weight")]:
        up = gate.replace(".mlp.gate.", ".mlp.up.")
        if up not in out:
            raise CheckpointError(f"checkpoint lacks {up} (needed with {gate})")
        out[gate.replace(".mlp.gate.", ".mlp.fc1.")] = torch.cat([out.pop(gate), out.pop(up)], 0)
    if SCORE in out:
        score = out.pop(SCORE)
        out.pop(LM_HEAD, None)
        if score.shape[0] != 1:
            raise CheckpointError(
                f"the checkpoint's score head has {score.shape[0]} rows; a reranker has exactly one"
            )
        out["head.weight"] = score
        return out
    if LM_HEAD in out:
        lm_head = out.pop(LM_HEAD)
    elif config.tie_word_embeddings and TIED_EMBEDDINGS in out:
        lm_head = out[TIED_EMBEDDINGS]
    else:
        raise CheckpointError(
            "checkpoint has neither lm_head.weight nor a score head (and its config does not tie "
            "the LM head to the embeddings); is it a complete causal LM or seq-cls checkpoint?"
        )
    if answer_ids is None:
        raise CheckpointError("a causal LM reranker needs its prompt template's answer tokens")
    yes, no = answer_ids
    for token_id in (yes, no):
        if token_id is not None and not 0 <= token_id < lm_head.shape[0]:
            raise CheckpointError(
                f"answer token id {token_id} is past the LM head's {lm_head.shape[0]} rows"
            )
    # Folded in float32: rows of a bf16 checkpoint subtract exactly there; the head stays float32.
    row = lm_head[yes].float() - (0 if no is None else lm_head[no].float())
    out["head.weight"] = row[None, :].contiguous()
    return out


def load_decoder_model(
    directory: str,
    answer_ids: tuple[int, int | None] | None,
    allow_pickle: bool = False,
) -> tuple[DecoderModel, object, dict]:
    """Build a decoder reranker from a checkpoint directory, checking every key and shape (as
    `weights.load_model` does for the encoders). Returns (model, layout, config.json)."""
    raw_config = read_config(directory)
    state = read_weights(directory, allow_pickle)
    layout = detect_layout(list(state))
    config = decoder_config_from_json(raw_config, layout.name)
    converted = fold_decoder_state(convert_state_dict(state, layout), config, answer_ids)
    model = assign_checked(DecoderModel, config, converted, layout)
    warn_if_dummy(raw_config, directory)
    return model.eval(), layout, raw_config
