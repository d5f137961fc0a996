"""ModernBERT and GTE cross-encoders: their weight layouts and their shape from config.json, without torch.

Both are encoders with rotary positions (no position table) and a gated MLP, saved by transformers'
`ModernBertForSequenceClassification` (answerdotai/ModernBERT-base fine-tunes: Alibaba-NLP/gte-reranker-modernbert-base,
the ms-marco ModernBERT cross-encoders) and `GteForSequenceClassification` (gte-multilingual-reranker-base as
transformers' native GTE classes save it). The model itself is `rope_encoders.py`; the driver and the tokenize
stage need only these numbers, as for the other encoders (`model_config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import CheckpointError
from pipeline.model.model_config import ModelConfig

# The checkpoint's names -> ours. Ours are the other encoders' (`layers.N.mixer.Wqkv`, `mixer.out_proj`,
# `mlp.fc1`, `mlp.fc2`, `norm1`, `norm2`), so int8's layer patterns and the job's checks apply unchanged.
_MODERNBERT_LAYER = r"^model\.layers\.(\d+)\."
MODERNBERT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.embeddings\.tok_embeddings\.", "embeddings.word_embeddings."),
    (r"^model\.embeddings\.norm\.", "emb_ln."),
    (_MODERNBERT_LAYER + r"attn_norm\.", r"layers.\1.norm1."),  # absent in layer 0
    (_MODERNBERT_LAYER + r"attn\.Wqkv\.", r"layers.\1.mixer.Wqkv."),  # q, k, v rows in that order
    (_MODERNBERT_LAYER + r"attn\.Wo\.", r"layers.\1.mixer.out_proj."),
    (_MODERNBERT_LAYER + r"mlp_norm\.", r"layers.\1.norm2."),
    (_MODERNBERT_LAYER + r"mlp\.Wi\.", r"layers.\1.mlp.fc1."),  # GELU'd half, then the gate's half
    (_MODERNBERT_LAYER + r"mlp\.Wo\.", r"layers.\1.mlp.fc2."),
    (r"^model\.final_norm\.", "final_norm."),
    (r"^head\.dense\.", "head.dense."),
    (r"^head\.norm\.", "head.norm."),
    (r"^classifier\.", "head.out_proj."),
)

# What transformers' GTE classes save (the hub's `new.` names, with `gte.` or `new.` in front: q, k, v fused, the up
# projection stacked before the gate), and their names in memory (separate projections), fused here the same way.
_GTE = r"^(?:new|gte)\."
_GTE_LAYER = r"^(?:new|gte)\.(?:encoder\.layer|layers)\.(\d+)\."
GTE_RENAMES: tuple[tuple[str, str], ...] = (
    (_GTE + r"embeddings\.word_embeddings\.", "embeddings.word_embeddings."),
    (_GTE + r"embeddings\.token_type_embeddings\.", "embeddings.token_type_embeddings."),
    (_GTE + r"embeddings\.LayerNorm\.", "emb_ln."),
    (_GTE_LAYER + r"attention\.qkv_proj\.", r"layers.\1.mixer.Wqkv."),
    (_GTE_LAYER + r"self_attn\.q_proj\.", r"layers.\1.mixer.query."),
    (_GTE_LAYER + r"self_attn\.k_proj\.", r"layers.\1.mixer.key."),
    (_GTE_LAYER + r"self_attn\.v_proj\.", r"layers.\1.mixer.value."),
    (_GTE_LAYER + r"(?:attention|self_attn)\.o_proj\.", r"layers.\1.mixer.out_proj."),
    (_GTE_LAYER + r"(?:attn_ln|post_attention_layernorm)\.", r"layers.\1.norm1."),
    (_GTE_LAYER + r"mlp\.up_gate_proj\.", r"layers.\1.mlp.fc1."),
    (_GTE_LAYER + r"mlp\.up_proj\.", r"layers.\1.mlp.up."),
    (_GTE_LAYER + r"mlp\.gate_proj\.", r"layers.\1.mlp.gate."),
    (_GTE_LAYER + r"mlp\.down_proj\.", r"layers.\1.mlp.fc2."),
    (_GTE_LAYER + r"(?:mlp_ln|post_mlp_layernorm)\.", r"layers.\1.norm2."),
    (_GTE + r"pooler\.dense\.", "head.dense."),
    (r"^classifier\.", "head.out_proj."),
)
# Separate projections stacked into one Linear layer, rows in the order given: (fused, parts).
GTE_FUSE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mixer.Wqkv", ("mixer.query", "mixer.key", "mixer.value")),
    ("mlp.fc1", ("mlp.up", "mlp.gate")),  # as up_gate_proj: the up projection's rows first
)

MODERNBERT_MARKER = r"^model\.layers\.\d+\.attn\.Wqkv\.weight$"
GTE_MARKER = r"^(?:new|gte)\.(?:encoder\.layer\.\d+\.attention\.qkv_proj|layers\.\d+\.self_attn\.q_proj)\.weight$"
# Buffers some exports carry; recomputed from the config.
ROTARY_BUFFERS = (r".*rotary_emb\..*inv_freq$",)

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


@dataclass(frozen=True)
class RopeEncoderConfig(ModelConfig):
    """`ModelConfig` plus what the rotary encoders add. Positions restart at 0 per sequence.

    ModernBERT: pre-norm layers; layer i attends globally (`rope_theta`) or within `local_window` tokens on either
    side (`local_rope_theta`) as `local_layers[i]` says; a final norm; CLS or mean pooling; head dense -> act -> norm
    -> out_proj. GTE: post-norm layers, all global; head dense -> tanh -> out_proj on the first token.
    """

    family: str = "modernbert"  # modernbert | gte
    rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_layers: tuple[bool, ...] = ()
    local_window: int = (
        64  # a local layer's token sees the tokens at most this far away, both sides
    )
    pooling: str = "cls"  # cls | mean
    # Which half of fc1's output goes through the activation: the first in ModernBERT's Wi, the second (the gate)
    # in GTE's up_gate_proj.
    activate_first_half: bool = True
    head_act: str = "gelu"
    norm_bias: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    classifier_bias: bool = True

    @property
    def pre_norm(self) -> bool:
        return self.family == "modernbert"


def _rope_theta(params: dict | None, fallback: float, what: str) -> float:
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{what}: rope_type {rope_type!r} is not supported (only the default rotary positions)"
        )
    return float(params.get("rope_theta", fallback))


def _common(config: dict, family: str) -> dict:
    def need(key):
        if key not in config:
            raise CheckpointError(f"config.json lacks `{key}`")
        return config[key]

    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 1)
    if num_labels != 1:
        raise CheckpointError(
            f"the checkpoint has {num_labels} labels; a reranker has exactly one relevance logit"
        )
    act_key = "hidden_activation" if family == "modernbert" else "hidden_act"
    act = config.get(act_key, "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{act_key}={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    return dict(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=need("num_attention_heads"),
        intermediate_size=need("intermediate_size"),
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        position_offset=0,
        hidden_act=_ACTIVATIONS[act],
        num_labels=1,
        family=family,
    )


def modernbert_config(config: dict) -> RopeEncoderConfig:
    """config.json of a ModernBERT sequence classifier, as transformers 4.48+ (`global_rope_theta`,
    `global_attn_every_n_layers`) or 5 (`rope_parameters`, `layer_types`) writes it."""
    common = _common(config, "modernbert")
    layers = common["num_hidden_layers"]
    if config.get("layer_types"):
        kinds = list(config["layer_types"])
        unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
        if unknown or len(kinds) != layers:
            raise CheckpointError(
                f"layer_types must name full_attention or sliding_attention for each of the {layers} "
                f"layers, got {kinds!r:.200}"
            )
        local = tuple(kind == "sliding_attention" for kind in kinds)
    else:
        every = int(config.get("global_attn_every_n_layers", 3))
        local = tuple(i % every != 0 for i in range(layers))
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling"):
        _rope_theta(config["rope_scaling"], 0.0, "rope_scaling")
    pooling = config.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise CheckpointError(f"classifier_pooling={pooling!r} is not supported; use cls or mean")
    head_act = config.get("classifier_activation", "gelu")
    if head_act not in _ACTIVATIONS:
        raise CheckpointError(
            f"classifier_activation={head_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    pad = config.get("pad_token_id")
    return RopeEncoderConfig(
        **common,
        type_vocab_size=1,
        layer_norm_eps=config.get("norm_eps", 1e-5),
        pad_token_id=int(pad if pad is not None else 0),
        rope_theta=_rope_theta(
            rope.get("full_attention"),
            config.get("global_rope_theta", 160_000.0),
            "rope_parameters.full_attention",
        ),
        local_rope_theta=_rope_theta(
            rope.get("sliding_attention"),
            config.get("local_rope_theta", 10_000.0),
            "rope_parameters.sliding_attention",
        ),
        local_layers=local,
        # `local_attention` is the whole window (128): 64 tokens on either side of each token.
        local_window=int(config.get("local_attention", 128)) // 2,
        pooling=pooling,
        head_act=_ACTIVATIONS[head_act],
        norm_bias=bool(config.get("norm_bias", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        classifier_bias=bool(config.get("classifier_bias", False)),
    )


def gte_config(config: dict) -> RopeEncoderConfig:
    """config.json of transformers' native GTE sequence classifier (`rope_parameters`, or `rope_theta` on top)."""
    common = _common(config, "gte")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    pad = config.get("pad_token_id")
    return RopeEncoderConfig(
        **common,
        type_vocab_size=config.get("type_vocab_size", 1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        pad_token_id=int(pad if pad is not None else 1),
        rope_theta=_rope_theta(rope, config.get("rope_theta", 160_000.0), "rope_parameters"),
        local_layers=(False,) * common["num_hidden_layers"],
        pooling="cls",
        head_act="tanh",
        mlp_bias=False,  # gate_proj and up_proj have none; down_proj has one (`GatedMlp`)
        activate_first_half=False,
    )


CONFIG_READERS = {"modernbert": modernbert_config, "gte": gte_config}
