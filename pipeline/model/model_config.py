"""The encoder's shape (`config.json`'s numbers), without torch: the driver and the CPU stages read it."""

from __future__ import annotations

from dataclasses import dataclass


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


def linear_layer_names(num_hidden_layers: int) -> list[str]:
    """The encoder's Linear layers by name, as int8's `fp32_layers` patterns match them ("layers.0.mixer.Wqkv" ...
    "layers.11.mlp.fc2"): `quantization.encoder_linears` of the model, known here from the layer count alone, so
    the driver checks patterns without loading weights (or torch)."""
    return [
        f"layers.{i}.{name}"
        for i in range(num_hidden_layers)
        for name in ("mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")
    ]
