"""The shape of a decoder reranker (Qwen3-Reranker, Qwen2-based rerankers) from its config.json, without torch.

A decoder reranker is a causal language model read at each prompt's last token. The driver and the tokenize
stage need its numbers (layers for int8 patterns, the position limit for max_length) without loading torch,
as for the encoders (`model_config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import CheckpointError
from pipeline.model.model_config import ModelConfig

# Layouts (see `checkpoint.LAYOUTS`) whose model is `decoder.DecoderModel`, with what tells them apart.
DECODER_LAYOUTS = ("qwen3", "qwen2")


@dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """`ModelConfig` plus what a decoder adds: grouped-query heads, an explicit head size (Qwen3-0.6B has 16
    heads of 128 on a 1,024-wide stream), rotary positions, per-head q/k RMSNorm (Qwen3) or q/k/v biases
    (Qwen2), and where the score comes from."""

    num_key_value_heads: int = 8
    head_size: int = 128
    rope_theta: float = 1_000_000.0
    qk_norm: bool = True  # Qwen3: RMSNorm over each head's queries and keys before the rotation
    attention_bias: bool = False  # Qwen2: biases on the q, k, v projections
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix (Qwen3-Reranker-0.6B)

    @property
    def head_dim(self) -> int:
        return self.head_size


def decoder_config_from_json(config: dict, layout_name: str) -> DecoderConfig:
    """config.json of a Qwen3 / Qwen2 checkpoint (causal LM or sequence classification) -> DecoderConfig."""

    def need(key):
        if key not in config:
            raise CheckpointError(f"config.json lacks `{key}`")
        return config[key]

    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"hidden_act={config['hidden_act']!r} is not supported for the {layout_name} layout "
            "(its MLP is SwiGLU: silu)"
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
        hidden_act="silu",
        num_labels=1,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_size=config.get("head_dim") or hidden // heads,
        rope_theta=float(theta),
        qk_norm=layout_name == "qwen3",
        # Qwen2 always has q, k, v biases (its config has no switch); Qwen3 has them only when asked.
        attention_bias=layout_name == "qwen2" or bool(config.get("attention_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
