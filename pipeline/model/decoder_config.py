"""A decoder reranker's shape (Qwen3-Reranker, Qwen2-based, bge-reranker-v2-gemma) from config.json, no torch.

A decoder reranker is a causal language model read at each prompt's last token. The driver and the tokenize
stage need its numbers (layers for int8 patterns, the position limit for max_length) without loading torch,
as for the encoders (`model_config.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core.errors import CheckpointError
from pipeline.model.model_config import ModelConfig

# Layouts (see `checkpoint.LAYOUTS`) whose model is `decoder.DecoderModel`, with what tells them apart.
DECODER_LAYOUTS = ("qwen3", "qwen2", "gemma")

# hidden_act values of a decoder's gated MLP -> ours. Gemma's configs say "gelu" for the tanh approximation it was
# trained with (transformers reads that legacy value as gelu_pytorch_tanh, and so do we).
DECODER_ACTIVATIONS = {
    "qwen3": {"silu": "silu"},
    "qwen2": {"silu": "silu"},
    "gemma": {"gelu": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"},
}


@dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """`ModelConfig` plus what a decoder adds: grouped-query heads, an explicit head size (Qwen3-0.6B has 16
    heads of 128 on a 1,024-wide stream), rotary positions, per-head q/k RMSNorm (Qwen3) or q/k/v biases
    (Qwen2), and where the score comes from. Gemma differs from them only in data: RMSNorm scales by
    (1 + weight) in float32, the gated MLP's activation is tanh-approximated GELU (`hidden_act`), the
    embeddings are multiplied by sqrt(hidden_size), and the LM head is tied to them."""

    num_key_value_heads: int = 8
    head_size: int = 128
    rope_theta: float = 1_000_000.0
    qk_norm: bool = True  # Qwen3: RMSNorm over each head's queries and keys before the rotation
    attention_bias: bool = False  # Qwen2: biases on the q, k, v projections
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix (Qwen3-Reranker-0.6B)
    # RMSNorm's scale is norm_offset + weight. Gemma (offset 1) applies it in float32 before the cast back to the
    # model's dtype; Qwen (offset 0) casts first and multiplies in the model's dtype, as transformers does each.
    norm_offset: float = 0.0
    # The embeddings' multiplier. Gemma: sqrt(hidden_size), rounded to the model's dtype as transformers does.
    embed_scale: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.head_size


def decoder_config_from_json(config: dict, layout_name: str) -> DecoderConfig:
    """config.json of a Qwen3 / Qwen2 (causal LM or sequence classification) or Gemma (causal LM) checkpoint
    -> DecoderConfig."""

    def need(key):
        if key not in config:
            raise CheckpointError(f"config.json lacks `{key}`")
        return config[key]

    gemma = layout_name == "gemma"
    model_type = config.get("model_type")
    if gemma and model_type != "gemma":
        # Llama, Mistral and Gemma 2 checkpoints carry Gemma's weight names (or most of them) but compute
        # otherwise: refused rather than scored as Gemma.
        raise CheckpointError(
            f"config.json says model_type={model_type!r}, and among checkpoints with these weight names "
            "(model.layers.N.self_attn.q_proj, no q/k norms or biases) only Gemma (model_type "
            "'gemma', e.g. BAAI/bge-reranker-v2-gemma) is supported"
        )
    activations = DECODER_ACTIVATIONS[layout_name]
    # transformers 4.4x wrote Gemma's activation as `hidden_activation` next to the legacy `hidden_act`.
    act = (config.get("hidden_activation") if gemma else None) or config.get("hidden_act")
    act = act or next(iter(activations))
    if act not in activations:
        raise CheckpointError(
            f"hidden_act={act!r} is not supported for the {layout_name} layout (supported: "
            f"{', '.join(sorted(activations))})"
        )
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(
            f"rope_scaling type {rope_type!r} is not supported (only the default rotary positions)"
        )
    # transformers 4 writes rope_theta at the top; 5 inside rope_parameters; its default is 10,000.
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10_000.0
    if config.get("use_sliding_window"):
        raise CheckpointError(
            "use_sliding_window=true is not supported for decoder rerankers (full causal attention only)"
        )
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    return DecoderConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        intermediate_size=need("intermediate_size"),
        max_position_embeddings=need("max_position_embeddings"),
        type_vocab_size=1,
        layer_norm_eps=config.get("rms_norm_eps", 1e-6),
        pad_token_id=int(config.get("pad_token_id") or 0),
        position_offset=0,
        hidden_act=activations[act],
        num_labels=1,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_size=config.get("head_dim") or hidden // heads,
        rope_theta=float(theta),
        qk_norm=layout_name == "qwen3",
        # Qwen2 always has q, k, v biases (its config has no switch); Qwen3 has them only when asked.
        attention_bias=layout_name == "qwen2" or bool(config.get("attention_bias", False)),
        # Gemma's config.json leaves the tie out: transformers' GemmaConfig ties by default.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
    )
