"""Checkpoints on disk: where they are, which layout, what shape; strict, safe, no remote code.

Three layouts are recognised from the *weight names* (not from `architectures`: jina's config says
`XLMRobertaForSequenceClassification` and has no `model_type`, yet its weights use flash-attention's names):

| layout         | example checkpoint                          | recognised by                    |
|----------------|---------------------------------------------|----------------------------------|
| `jina_flash`   | jinaai/jina-reranker-v2-base-multilingual   | `roberta.encoder.layers.N.mixer.Wqkv` |
| `xlm_roberta`  | BAAI/bge-reranker-v2-m3                     | `roberta.encoder.layer.N.attention.self.query` |
| `bert`         | cross-encoder/ms-marco-MiniLM-L6-v2         | `bert.encoder.layer.N.attention.self.query` |
| `modernbert`   | Alibaba-NLP/gte-reranker-modernbert-base    | `model.layers.N.attn.Wqkv` |
| `gte`          | gte-multilingual-reranker-base (transformers' GTE) | `gte.layers.N.self_attn.q_proj` |
| `qwen3`        | Qwen/Qwen3-Reranker-0.6B (decoder, `decoder.py`) | `model.layers.N.self_attn.q_norm` |
| `qwen2`        | Qwen2-based decoder rerankers               | `model.layers.N.self_attn.q_proj.bias` |
| `gemma`        | BAAI/bge-reranker-v2-gemma (decoder)        | `model.layers.N.self_attn.q_proj` and config.json's model_type "gemma" |

Renames are data (`Layout.renames`, first matching pattern wins); the transformers layouts' separate
query/key/value projections are fused into `Wqkv` rows in q, k, v order, exactly as jina's checkpoint
stores them. Missing or unexpected keys and shape mismatches are errors that name the key. Weights load
from safetensors; a pickle `.bin` is refused unless the caller opts in, and even then it is read with
`torch.load(weights_only=True)` (`weights.py`, the one module here that needs torch).

Nothing here imports torch: the driver and the CPU stages (tokenize, write) resolve and inspect checkpoints
without it, which spares each of those processes ~190 MB of resident memory and 1.5-4 s of start-up
(measured 2026-11-30 on the 2-core AMD EPYC CI machine).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

from pipeline.core.errors import CheckpointError
from pipeline.model.decoder_config import DECODER_LAYOUTS, decoder_config_from_json
from pipeline.model.dummy import DUMMY_MARKER, dummy_checkpoint  # noqa: F401 (the marker is re-exported)
from pipeline.model.model_config import ModelConfig
from pipeline.model.rope_config import (
    CONFIG_READERS,
    GTE_FUSE,
    GTE_MARKER,
    GTE_RENAMES,
    MODERNBERT_MARKER,
    MODERNBERT_RENAMES,
    ROTARY_BUFFERS,
)


@dataclass(frozen=True)
class Layout:
    name: str
    marker: str  # regex matched against weight names to recognise the layout
    renames: tuple[tuple[str, str], ...]  # (checkpoint-name regex, our name); first match wins
    ignored: tuple[
        str, ...
    ] = ()  # regexes of weights that exist in such checkpoints but are unused
    fuse_qkv: bool = False
    roberta_positions: bool = True  # positions start at padding_idx + 1 (RoBERTa) or 0 (BERT)
    # (fused name, part names): parts stacked by rows into one Linear layer, e.g. GTE's gate and up projections
    fuse: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _transformers_layer_renames(prefix: str) -> tuple[tuple[str, str], ...]:
    layer = rf"^{prefix}\.encoder\.layer\.(\d+)\."
    return (
        (layer + r"attention\.self\.(query|key|value)\.", r"layers.\1.mixer.\2."),
        (layer + r"attention\.output\.dense\.", r"layers.\1.mixer.out_proj."),
        (layer + r"attention\.output\.LayerNorm\.", r"layers.\1.norm1."),
        (layer + r"intermediate\.dense\.", r"layers.\1.mlp.fc1."),
        (layer + r"output\.dense\.", r"layers.\1.mlp.fc2."),
        (layer + r"output\.LayerNorm\.", r"layers.\1.norm2."),
        (rf"^{prefix}\.embeddings\.LayerNorm\.", "emb_ln."),
        (rf"^{prefix}\.embeddings\.", "embeddings."),
    )


LAYOUTS: dict[str, Layout] = {
    "jina_flash": Layout(
        name="jina_flash",
        marker=r"^roberta\.encoder\.layers\.\d+\.mixer\.Wqkv\.weight$",
        renames=(
            (r"^roberta\.embeddings\.", "embeddings."),
            (r"^roberta\.emb_ln\.", "emb_ln."),
            (r"^roberta\.encoder\.layers\.(\d+)\.", r"layers.\1."),
            (r"^classifier\.", "head."),
        ),
        ignored=(r"^roberta\.pooler\.",),
    ),
    "xlm_roberta": Layout(
        name="xlm_roberta",
        marker=r"^roberta\.encoder\.layer\.\d+\.attention\.self\.query\.weight$",
        renames=_transformers_layer_renames("roberta") + ((r"^classifier\.", "head."),),
        ignored=(r"^roberta\.embeddings\.position_ids$", r"^roberta\.pooler\."),
        fuse_qkv=True,
    ),
    "bert": Layout(
        name="bert",
        marker=r"^bert\.encoder\.layer\.\d+\.attention\.self\.query\.weight$",
        renames=_transformers_layer_renames("bert")
        + (
            (r"^bert\.pooler\.dense\.", "head.dense."),
            (r"^classifier\.", "head.out_proj."),
        ),
        ignored=(r"^bert\.embeddings\.position_ids$",),
        fuse_qkv=True,
        roberta_positions=False,
    ),
    "modernbert": Layout(
        name="modernbert",
        marker=MODERNBERT_MARKER,
        renames=MODERNBERT_RENAMES,
        ignored=ROTARY_BUFFERS,
        roberta_positions=False,
    ),
    "gte": Layout(
        name="gte",
        marker=GTE_MARKER,
        renames=GTE_RENAMES,
        ignored=ROTARY_BUFFERS,
        roberta_positions=False,
        fuse=GTE_FUSE,
    ),
}


def detect_layout(names: list[str]) -> Layout:
    for layout in LAYOUTS.values():
        if any(re.match(layout.marker, n) for n in names):
            return layout
    sample = ", ".join(sorted(names)[:5])
    raise CheckpointError(
        f"unknown checkpoint layout (weights start with: {sample}, ...); supported: jina-reranker-v2 "
        "(flash layout), XLM-RoBERTa, BERT, ModernBERT and GTE sequence classification as saved by "
        "transformers, and Qwen3 / Qwen2 / Gemma decoder rerankers (causal LM or seq-cls)"
    )


def model_config_from_json(config: dict, layout: Layout) -> ModelConfig:
    if layout.name in CONFIG_READERS:  # the rotary encoders (rope_config.py)
        return CONFIG_READERS[layout.name](config)

    def need(key):
        if key not in config:
            raise CheckpointError(f"config.json lacks `{key}`")
        return config[key]

    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"position_embedding_type={config['position_embedding_type']!r} is not supported "
            "(only absolute positions, as in XLM-RoBERTa and BERT)"
        )
    if layout.name in DECODER_LAYOUTS:
        return decoder_config_from_json(config, layout.name)
    acts = {
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
    }
    if config.get("hidden_act", "gelu") not in acts:
        raise CheckpointError(
            f"hidden_act={config['hidden_act']!r} is not supported; supported: {sorted(acts)}"
        )
    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 1)
    if num_labels != 1:
        raise CheckpointError(
            f"the checkpoint has {num_labels} labels; a reranker has exactly one relevance logit"
        )
    pad = int(config.get("pad_token_id", 1 if layout.roberta_positions else 0))
    return ModelConfig(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=need("num_attention_heads"),
        intermediate_size=need("intermediate_size"),
        max_position_embeddings=need("max_position_embeddings"),
        type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        pad_token_id=pad,
        position_offset=pad + 1 if layout.roberta_positions else 0,
        hidden_act=acts[config.get("hidden_act", "gelu")],
        num_labels=1,
    )


def _decoder_renames() -> tuple[tuple[str, str], ...]:
    """transformers' Qwen2/Qwen3 names -> `decoder.DecoderModel`'s (q, k, v fused as for the encoders; gate and
    up fused, and the score head folded, by `decoder.fold_decoder_state`)."""
    layer = r"^model\.layers\.(\d+)\."
    return (
        (layer + r"self_attn\.q_proj\.", r"layers.\1.mixer.query."),
        (layer + r"self_attn\.k_proj\.", r"layers.\1.mixer.key."),
        (layer + r"self_attn\.v_proj\.", r"layers.\1.mixer.value."),
        (layer + r"self_attn\.o_proj\.", r"layers.\1.mixer.out_proj."),
        (layer + r"self_attn\.(q_norm|k_norm)\.", r"layers.\1.mixer.\2."),
        (layer + r"input_layernorm\.", r"layers.\1.norm1."),
        (layer + r"post_attention_layernorm\.", r"layers.\1.norm2."),
        (layer + r"mlp\.gate_proj\.", r"layers.\1.mlp.gate."),
        (layer + r"mlp\.up_proj\.", r"layers.\1.mlp.up."),
        (layer + r"mlp\.down_proj\.", r"layers.\1.mlp.fc2."),
        (r"^model\.embed_tokens\.", "embed_tokens."),
        (r"^model\.norm\.", "norm."),
        (r"^(lm_head|score)\.", r"\1."),
    )


# Decoder rerankers (`decoder.py`): Qwen/Qwen3-Reranker-* as Qwen3ForCausalLM (lm_head, or the embeddings when
# tied) or in the converted seq-cls form (a 1-row `score`), recognised by the per-head q/k norms; Qwen2
# (mxbai-rerank-v2 style) by its q/k/v biases, otherwise the same names. Gemma (bge-reranker-v2-gemma) has
# neither: checked last, its names are also Llama's, so `decoder_config_from_json` refuses a config.json
# whose model_type is not "gemma".
for _name, _marker in (
    ("qwen3", r"^model\.layers\.\d+\.self_attn\.q_norm\.weight$"),
    ("qwen2", r"^model\.layers\.\d+\.self_attn\.q_proj\.bias$"),
    ("gemma", r"^model\.layers\.\d+\.self_attn\.q_proj\.weight$"),
):
    LAYOUTS[_name] = Layout(
        name=_name,
        marker=_marker,
        renames=_decoder_renames(),
        ignored=(r"\.rotary_emb\.inv_freq$",),
        fuse_qkv=True,
        roberta_positions=False,
    )


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> tuple[str, str]:
    """A local directory, or a hub id downloaded (and cached) by huggingface_hub. Returns (directory, revision)."""
    expanded = os.path.expanduser(name_or_path)
    looks_local = (
        os.path.isabs(expanded)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
    )
    if os.path.isdir(expanded):
        return expanded, revision or f"local:{fingerprint(expanded)}"
    if looks_local or os.path.exists(expanded):
        raise CheckpointError(
            f"checkpoint directory {name_or_path!r} not found (or not a directory)"
        )
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(
            repo_id=name_or_path,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except Exception as e:  # offline, unknown repo, gated repo: all need the same advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub and it is not in the local cache "
            f"({first}); on an offline machine pass a local checkpoint directory to --model "
            "(or `dummy:<architecture>` for a random-weight smoke run)"
        ) from None
    return directory, os.path.basename(os.path.normpath(directory))


def fingerprint(directory: str) -> str:
    """A cheap content id for a local checkpoint: weight file names, sizes and safetensors headers."""
    digest = hashlib.sha256()
    for path in sorted(
        glob.glob(os.path.join(directory, "*.safetensors"))
        + [os.path.join(directory, "config.json")]
    ):
        if not os.path.isfile(path):
            continue
        digest.update(os.path.basename(path).encode())
        digest.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:12]


def pickle_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.bin")))


def refuse_pickles(directory: str, pickles: list[str]) -> None:
    raise CheckpointError(
        f"{directory!r} only has pickle weights ({os.path.basename(pickles[0])}); pickles can run code when "
        "loaded. Convert them to safetensors, or set allow_pickle=true (`--set allow_pickle=true`) if you "
        "trust the file"
    )


def unreadable_weights(path: str, error: Exception) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(
        f"{path} is not a readable safetensors file ({first}); download or convert the "
        "checkpoint again"
    )


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory!r} has no config.json; is it a model checkpoint directory?"
        )
    with open(path) as f:
        return json.load(f)


def inspect_checkpoint(
    directory: str, allow_pickle: bool = False
) -> tuple[Layout | None, ModelConfig]:
    """Layout and config of a checkpoint without loading its weights: safetensors headers only, and for a
    pickle-only checkpoint the file names alone (it is never unpickled here, on the driver). The layout of a
    pickle checkpoint is None: the scorers find it when they load the weights."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    names: list[str] = []
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:  # names only: no torch
                names.extend(f.keys())
        except Exception as e:
            raise unreadable_weights(path, e) from None
    raw_config = read_config(directory)
    if files:
        layout = detect_layout(names)
        return layout, model_config_from_json(raw_config, layout)
    pickles = pickle_files(directory)
    if not pickles:
        raise CheckpointError(f"no weights in {directory!r}: expected model.safetensors")
    if not allow_pickle:
        refuse_pickles(directory, pickles)
    # Only the position numbering matters before the weights are read (it bounds max_length).
    model_type = raw_config.get("model_type")
    if model_type in CONFIG_READERS:  # rotary positions: no table, no offset
        return None, CONFIG_READERS[model_type](raw_config)
    positions = LAYOUTS["bert" if model_type == "bert" else "xlm_roberta"]
    return None, model_config_from_json(raw_config, positions)


def resolve_model_directory(name_or_path: str, revision: str | None = None) -> tuple[str, str]:
    """(directory, revision) for a local dir, a hub id, or `dummy:<architecture>` (built once and cached)."""
    if name_or_path.startswith("dummy:"):
        try:
            return dummy_checkpoint(name_or_path.split(":", 1)[1]), revision or "random-weights"
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return resolve_checkpoint(name_or_path, revision)
