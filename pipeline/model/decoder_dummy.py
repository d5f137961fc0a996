"""Random-weight decoder reranker checkpoints (Qwen3 / Qwen2), saved by transformers' own classes.

`dummy.build_checkpoint` builds `dummy:qwen3-reranker-0.6b` and `dummy:tiny-qwen3` here; tests build the
other forms (separate LM head, seq-cls, Qwen2). Like `dummy.py`, this module imports nothing of the project:
the loader imports the dummy builder, so the builder must not import the loader.
"""

from __future__ import annotations

import json
import os

# config.json key naming a checkpoint's prompt template (`templates.resolve_template` reads it).
TEMPLATE_KEY = "rerank_pipeline_template"

# Qwen's special tokens; `<think>` and `</think>` are ordinary added tokens there, as are `yes` and `no` here
# (the trained vocabulary need not hold them, and the template reads them as single tokens).
DECODER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DECODER_ADDED = ["<think>", "</think>", "yes", "no"]


def train_decoder_tokenizer(corpus, vocab_size: int):
    """A byte-level BPE tokenizer like Qwen's (no BOS, no post-processor), trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        list(corpus),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=DECODER_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.add_tokens(DECODER_ADDED)
    return tok


def build_decoder_checkpoint(
    directory: str,
    arch,
    corpus,
    dtype: str = "float32",
    *,
    form: str = "causal_lm",
    tie_word_embeddings: bool = True,
    template: str = "qwen3-reranker",
    config_keys: dict | None = None,
) -> str:
    """A complete random-weight reranker checkpoint for `dummy.Architecture` `arch` (layout qwen3 or qwen2) in
    `directory`: `form` "causal_lm" (Qwen3ForCausalLM, as Qwen/Qwen3-Reranker-* ship) or "seq_cls"
    (ForSequenceClassification with one label, as the converted checkpoints). config.json names `template`
    and gets `config_keys` (the dummy marker)."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    tok = train_decoder_tokenizer(corpus, arch.tokenizer_vocab)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=arch.max_position_embeddings,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    ).save_pretrained(directory)
    family = "Qwen3" if arch.layout == "qwen3" else "Qwen2"
    kwargs = dict(
        vocab_size=arch.vocab_size or tok.get_vocab_size(),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=arch.initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings and form == "causal_lm",
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    if arch.layout == "qwen3":
        kwargs["head_dim"] = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    if form == "seq_cls":
        kwargs["num_labels"] = 1
    config = getattr(transformers, f"{family}Config")(**kwargs)
    head = "ForCausalLM" if form == "causal_lm" else "ForSequenceClassification"
    torch.manual_seed(arch.seed)
    model = getattr(transformers, family + head)(config).eval()
    # RMSNorm weights start at ones: drawn instead, so that a rename between two norms changes the scores.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved[TEMPLATE_KEY] = template
    saved.update(config_keys or {})
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)
    return directory
