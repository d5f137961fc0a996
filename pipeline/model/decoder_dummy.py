"""Random-weight decoder reranker checkpoints (Qwen3 / Qwen2 / Gemma), saved by transformers' own classes.

`dummy.build_checkpoint` builds `dummy:qwen3-reranker-0.6b`, `dummy:tiny-qwen3`, `dummy:bge-reranker-v2-gemma`
and `dummy:tiny-gemma` here; tests build the other forms (separate LM head, seq-cls, Qwen2). Like `dummy.py`, this module imports nothing of the project:
the loader imports the dummy builder, so the builder must not import the loader.
"""

from __future__ import annotations

import json
import os
import string

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


# Gemma's special tokens at Gemma's ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3); "Yes", the answer
# bge-reranker-v2-gemma is read at, is one token of Gemma's vocabulary, and added here as one.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA_ADDED = ["Yes"]


def train_gemma_tokenizer(corpus, vocab_size: int):
    """A BPE tokenizer like Gemma's SentencePiece one: spaces as "▁" kept on the next word, no prefix space,
    no post-processor (the template writes the BOS), unknown characters as <unk>, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    # Printable ASCII and the newline from the start (Gemma's vocabulary has every byte): the template's
    # "A: ", "\n" and the prompt are never <unk>, whatever the corpus.
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c") | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(list(corpus), trainer)
    tok.add_tokens(GEMMA_ADDED)
    return tok


def _save_tokenizer(tok, arch, directory: str) -> None:
    from transformers import PreTrainedTokenizerFast

    if arch.layout == "gemma":
        special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    else:
        special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=arch.max_position_embeddings,
        padding_side="left",
        **special,
    ).save_pretrained(directory)


# Per layout: transformers' class family, the template dummy checkpoints name, and the rotary base.
FAMILIES = {
    "qwen3": ("Qwen3", "qwen3-reranker", 1_000_000.0),
    "qwen2": ("Qwen2", "qwen3-reranker", 1_000_000.0),
    "gemma": ("Gemma", "bge-reranker-v2-gemma", 10_000.0),
}


def build_decoder_checkpoint(
    directory: str,
    arch,
    corpus,
    dtype: str = "float32",
    *,
    form: str = "causal_lm",
    tie_word_embeddings: bool = True,
    template: str | None = None,
    config_keys: dict | None = None,
) -> str:
    """A complete random-weight reranker checkpoint for `dummy.Architecture` `arch` (layout qwen3, qwen2 or
    gemma) in `directory`: `form` "causal_lm" (Qwen3ForCausalLM, as Qwen/Qwen3-Reranker-* ship;
    GemmaForCausalLM, as BAAI/bge-reranker-v2-gemma) or "seq_cls" (ForSequenceClassification with one label,
    as the converted checkpoints). config.json names `template` (None: the layout's) and gets
    `config_keys` (the dummy marker)."""
    import torch
    import transformers

    os.makedirs(directory, exist_ok=True)
    gemma = arch.layout == "gemma"
    if gemma:
        tok = train_gemma_tokenizer(corpus, arch.tokenizer_vocab)
    else:
        tok = train_decoder_tokenizer(corpus, arch.tokenizer_vocab)
    _save_tokenizer(tok, arch, directory)
    family, default_template, theta = FAMILIES[arch.layout]
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
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    if gemma:
        kwargs.update(
            pad_token_id=tok.token_to_id("<pad>"),
            eos_token_id=tok.token_to_id("<eos>"),
            bos_token_id=tok.token_to_id("<bos>"),
            hidden_act="gelu_pytorch_tanh",
        )
    else:
        kwargs.update(
            pad_token_id=tok.token_to_id("<|endoftext|>"),
            eos_token_id=tok.token_to_id("<|im_end|>"),
        )
    if arch.layout in ("qwen3", "gemma"):
        kwargs["head_dim"] = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    if form == "seq_cls":
        kwargs["num_labels"] = 1
    config = getattr(transformers, f"{family}Config")(**kwargs)
    head = "ForCausalLM" if form == "causal_lm" else "ForSequenceClassification"
    torch.manual_seed(arch.seed)
    model = getattr(transformers, family + head)(config).eval()
    # RMSNorm scales start at ones: drawn in [0.5, 1.5] instead, so that a rename between two norms changes the
    # scores (Gemma stores scale - 1).
    low = -0.5 if gemma else 0.5
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(low, low + 1.0)
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved[TEMPLATE_KEY] = template or default_template
    saved.update(config_keys or {})
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)
    return directory
