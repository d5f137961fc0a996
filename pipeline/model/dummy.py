"""The `dummy` load format (vLLM's `load_format="dummy"`): a named architecture with random weights.

`CrossEncoder.from_pretrained("dummy:jina-reranker-v2-base")` builds a real checkpoint directory (config,
safetensors in the architecture's own layout, a tokenizer trained locally in about a second) and loads
it through the ordinary loader, so benchmarks and offline smoke runs exercise the real loading code.
Everything produced from it says the weights are random: the loader logs it, jobs write it into their
summaries. Tests use `build_checkpoint` for tiny checkpoints in every layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

# The config.json key `build_checkpoint` sets: the weights are random. Defined here, where it is written, and
# read by the loader (`checkpoint.py`) and the engine; this module imports nothing of the project, so both
# can import it at the top without a cycle.
DUMMY_MARKER = "rerank_pipeline_dummy"


@dataclass(frozen=True)
class Architecture:
    layout: str  # jina_flash | xlm_roberta | bert | modernbert | gte | qwen3 | qwen2 | gemma
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int | None  # None: the trained tokenizer's size
    tokenizer_vocab: int = 8000
    initializer_range: float = 0.02
    seed: int = 0
    # Decoders (qwen3, qwen2, gemma): grouped-query kv heads and the head size (None: all heads, hidden / heads).
    num_key_value_heads: int | None = None
    head_dim: int | None = None


ARCHITECTURES: dict[str, Architecture] = {
    # jinaai/jina-reranker-v2-base-multilingual: 278M parameters, flash layout.
    "jina-reranker-v2-base": Architecture("jina_flash", 768, 12, 12, 3072, 1026, 250002),
    # BAAI/bge-reranker-v2-m3: 568M parameters, stock transformers XLM-RoBERTa.
    "bge-reranker-v2-m3": Architecture("xlm_roberta", 1024, 24, 16, 4096, 8194, 250002),
    # cross-encoder/ms-marco-MiniLM-L6-v2: 22M parameters, BERT.
    "ms-marco-minilm-l6": Architecture("bert", 384, 6, 12, 1536, 512, 30522),
    # Alibaba-NLP/gte-reranker-modernbert-base, answerdotai/ModernBERT-base fine-tunes (the ms-marco ModernBERT
    # cross-encoders): 150M parameters; global attention every 3rd layer, the others a 128-token window.
    "modernbert-base": Architecture("modernbert", 768, 22, 12, 1152, 8192, 50368),
    "gte-reranker-modernbert-base": Architecture("modernbert", 768, 22, 12, 1152, 8192, 50368),
    # Alibaba-NLP/gte-multilingual-reranker-base as transformers' native GTE classes save it: 306M parameters.
    "gte-multilingual-reranker-base": Architecture("gte", 768, 12, 12, 3072, 8192, 250048),
    # For tests and smoke runs: the ModernBERT and GTE layouts at toy size (layers 0 and 3 global).
    "tiny-modernbert": Architecture(
        "modernbert", 64, 4, 4, 96, 8192, None, tokenizer_vocab=2000, initializer_range=0.2
    ),
    "tiny-gte": Architecture(
        "gte", 64, 2, 4, 128, 8192, None, tokenizer_vocab=2000, initializer_range=0.2
    ),
    # For tests and smoke runs: the jina layout at toy size.
    "tiny": Architecture(
        "jina_flash", 64, 2, 4, 128, 1026, None, tokenizer_vocab=2000, initializer_range=0.2
    ),
    # Qwen/Qwen3-Reranker-0.6B: 596M parameters, Qwen3ForCausalLM with tied embeddings, rope_theta 1e6.
    "qwen3-reranker-0.6b": Architecture(
        "qwen3", 1024, 28, 16, 3072, 40960, 151669, num_key_value_heads=8, head_dim=128
    ),
    # For tests and smoke runs: the Qwen3 reranker at toy size (grouped-query: 4 heads, 2 kv heads).
    "tiny-qwen3": Architecture(
        "qwen3",
        64,
        2,
        4,
        128,
        40960,
        None,
        tokenizer_vocab=2000,
        initializer_range=0.2,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # BAAI/bge-reranker-v2-gemma: google/gemma-2b's shape, 2.5B parameters (0.5B of them the tied 256k x 2,048
    # embeddings), one kv head for 8 query heads of 256.
    "bge-reranker-v2-gemma": Architecture(
        "gemma", 2048, 18, 8, 16384, 8192, 256000, num_key_value_heads=1, head_dim=256
    ),
    # For tests and smoke runs: Gemma at toy size (multi-query: 4 heads of 32 on a 64-wide stream, 1 kv head).
    "tiny-gemma": Architecture(
        "gemma",
        64,
        2,
        4,
        128,
        8192,
        None,
        tokenizer_vocab=2000,
        initializer_range=0.2,
        num_key_value_heads=1,
        head_dim=32,
    ),
}

# A few sentences in several scripts so the default tokenizer covers them; benchmarks pass their own corpus.
DEFAULT_CORPUS = [
    "Organic skincare products for sensitive skin contain natural ingredients.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Batch reranking scores every query and candidate document pair with a cross-encoder.",
    "Die Hauptstadt von Deutschland ist Berlin, eine Stadt mit langer Geschichte.",
    "La capital de España es Madrid y tiene muchos museos famosos.",
    "Столица России — Москва, крупнейший город страны.",
    "中国的首都是北京，一个历史悠久的城市。",
    "日本の首都は東京です。人口が多い都市です。",
    "عاصمة مصر هي القاهرة، وهي مدينة كبيرة.",
    "भारत की राजधानी नई दिल्ली है।",
    "ประเทศไทยมีเมืองหลวงคือกรุงเทพมหานคร",
    "SELECT name FROM singer WHERE age > 30 ORDER BY name;",
    "def compute_score(pairs, batch_size=32): return [model(p) for p in pairs]",
    '{"name": "get_weather", "parameters": {"city": {"type": "string"}}}',
]


def train_tokenizer(layout: str, corpus: Iterable[str], vocab_size: int):
    """A fast tokenizer trained locally: Unigram + Metaspace like XLM-R (and GTE), WordPiece like BERT, or
    byte-level BPE like ModernBERT."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    texts = list(corpus)
    if layout == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    elif layout == "modernbert":
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    else:
        # XLM-R's ids: <s>=0, <pad>=1, </s>=2, <unk>=3; pad=1 sets the RoBERTa position offset.
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            texts,
            trainers.UnigramTrainer(
                vocab_size=vocab_size,
                special_tokens=specials,
                unk_token="<unk>",
                shrinking_factor=0.75,
            ),
        )
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B:0 </s>:0",
            special_tokens=[("<s>", 0), ("</s>", 2)],
        )
    return tok


def _save_tokenizer(tok, layout: str, directory: str) -> None:
    """tokenizer.json plus the transformers files, so AutoTokenizer (the reference in tests) loads it too."""
    from transformers import PreTrainedTokenizerFast

    if layout in ("bert", "modernbert"):
        special = dict(
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
        if layout == "modernbert":  # no token types
            special["model_input_names"] = ["input_ids", "attention_mask"]
    else:
        special = dict(
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token="<mask>",
        )
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **special).save_pretrained(
        directory
    )


def reference_model(directory: str):
    """The transformers model a dummy checkpoint was built from (same seed, same weights): the parity reference."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    arch = Architecture(**config["rerank_pipeline_architecture"])
    return _reference_model(arch, config["vocab_size"], config["pad_token_id"])


def _reference_model(arch: Architecture, vocab_size: int, pad_token_id: int):
    """The transformers model with random weights: the same classes the real checkpoints were saved from."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GteConfig,
        GteForSequenceClassification,
        ModernBertConfig,
        ModernBertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    torch.manual_seed(arch.seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        num_labels=1,
        pad_token_id=pad_token_id,
        initializer_range=arch.initializer_range,
    )
    if arch.layout == "modernbert":
        # The defaults' special ids are the real vocabulary's (50281...): the trained tokenizer has its own.
        config = ModernBertConfig(
            **common, bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None
        )
        return ModernBertForSequenceClassification(config).eval()
    if arch.layout == "gte":
        return GteForSequenceClassification(GteConfig(**common, type_vocab_size=1)).eval()
    if arch.layout == "bert":
        return BertForSequenceClassification(
            BertConfig(**common, type_vocab_size=2, layer_norm_eps=1e-12)
        ).eval()
    config = XLMRobertaConfig(
        **common, type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2
    )
    return XLMRobertaForSequenceClassification(config).eval()


def to_jina_flash(state: dict) -> dict:
    """A transformers XLM-R state dict in the layout jina-reranker-v2's model.safetensors uses."""
    import re

    import torch

    out = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        m = re.match(r"roberta\.encoder\.layer\.(\d+)\.(.*)", name)
        if m is None:
            out[name.replace("roberta.embeddings.LayerNorm.", "roberta.emb_ln.")] = tensor
            continue
        i, rest = m.groups()
        prefix = f"roberta.encoder.layers.{i}."
        if rest.startswith("attention.self.query."):
            kind = rest.rsplit(".", 1)[1]
            base = f"roberta.encoder.layer.{i}.attention.self."
            out[prefix + "mixer.Wqkv." + kind] = torch.cat(
                [state[base + p + "." + kind] for p in ("query", "key", "value")], dim=0
            )
        elif rest.startswith(("attention.self.key.", "attention.self.value.")):
            continue
        else:
            renames = {
                "attention.output.dense.": "mixer.out_proj.",
                "attention.output.LayerNorm.": "norm1.",
                "intermediate.dense.": "mlp.fc1.",
                "output.dense.": "mlp.fc2.",
                "output.LayerNorm.": "norm2.",
            }
            for old, new in renames.items():
                if rest.startswith(old):
                    out[prefix + new + rest[len(old) :]] = tensor
                    break
    return {k: v.contiguous() for k, v in out.items()}


def build_checkpoint(
    directory: str, arch: Architecture, corpus: Iterable[str] | None = None, dtype: str = "float32"
) -> str:
    """Write a complete random-weight checkpoint for `arch` into `directory` (created)."""
    if arch.layout in ("qwen3", "qwen2", "gemma"):  # decoder rerankers
        from pipeline.model.decoder_dummy import build_decoder_checkpoint

        marker = {DUMMY_MARKER: True, "rerank_pipeline_architecture": asdict(arch)}
        text = corpus if corpus is not None else DEFAULT_CORPUS
        return build_decoder_checkpoint(directory, arch, text, dtype, config_keys=marker)
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tok = train_tokenizer(
        arch.layout, corpus if corpus is not None else DEFAULT_CORPUS, arch.tokenizer_vocab
    )
    _save_tokenizer(tok, arch.layout, directory)
    pad_id = tok.token_to_id("[PAD]" if arch.layout in ("bert", "modernbert") else "<pad>")
    vocab = arch.vocab_size or tok.get_vocab_size()
    model = _reference_model(arch, vocab, pad_id)
    torch_dtype = getattr(torch, dtype)
    if arch.layout == "jina_flash":
        state = to_jina_flash(model.state_dict())
        config = {  # the shape of jina-reranker-v2's config.json: no model_type, flash-attention options
            "architectures": ["XLMRobertaForSequenceClassification"],
            "attention_probs_dropout_prob": 0.1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": arch.hidden_size,
            "initializer_range": arch.initializer_range,
            "intermediate_size": arch.intermediate_size,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": arch.max_position_embeddings,
            "num_attention_heads": arch.num_attention_heads,
            "num_hidden_layers": arch.num_hidden_layers,
            "pad_token_id": pad_id,
            "position_embedding_type": "absolute",
            "type_vocab_size": 1,
            "vocab_size": vocab,
            "use_flash_attn": True,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
        }
        save_file(
            {k: v.to(torch_dtype) for k, v in state.items()},
            os.path.join(directory, "model.safetensors"),
        )
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    else:
        model.to(torch_dtype).save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config[DUMMY_MARKER] = True
    config["rerank_pipeline_architecture"] = asdict(arch)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def dummy_checkpoint(
    name: str, cache_dir: str | None = None, corpus: list[str] | None = None, **overrides
) -> str:
    """The directory of the named dummy checkpoint, built once and cached (safe under concurrent builders)."""
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown dummy architecture {name!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    arch = replace(ARCHITECTURES[name], **overrides)
    key = hashlib.sha256(json.dumps([asdict(arch), corpus], sort_keys=True).encode()).hexdigest()[
        :12
    ]
    root = cache_dir or os.environ.get(
        "RERANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rerank-pipeline")
    )
    target = os.path.join(root, "dummy", f"{name}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{name}-")
    big = (arch.vocab_size or 0) * arch.hidden_size > 50_000_000
    build_checkpoint(staging, arch, corpus, dtype="bfloat16" if big else "float32")
    try:
        os.rename(staging, target)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
