"""The checkpoints every contender loads: one directory per architecture, shared by all of them.

Random weights in the shapes of the real rerankers (`pipeline.model.dummy.ARCHITECTURES`), saved in the
stock transformers XLM-RoBERTa layout so sentence-transformers and `AutoModelForSequenceClassification`
load the very same directory our engine loads (jina's flash layout differs only in weight *names*; the
FLOPs are the same); the ModernBERT and GTE shapes are saved in their own layouts, which sentence-transformers
loads through their own transformers classes. Weights are float32 on disk, like bge-reranker-v2-m3's real
checkpoint, so a library left at its defaults computes in float32, as it would for the real model.

The tokenizer is trained on the workloads' own text (TREC DL 2019 passages and queries, Vaswani
abstracts, XQuAD-R sentences and questions in eight languages) with a 32,000-piece vocabulary: token
counts then come close to a real XLM-R tokenizer's (DL19 pairs: ~96 tokens per pair here; ~84 with an
English WordPiece vocabulary). With the default tiny corpus the tokenizer is near character-level and
every pair would be ~3x longer than in real use.

Scores that spread like a real reranker's: with transformers' default initializer range (0.02) a random
model's logits span ~0.1 (std ~0.02) and bf16 rounding alone reorders them, so a rank correlation against
fp32 measures noise. The benchmark checkpoints are built with a wider initializer range (0.05: the pairs'
logits differ ~10x more while bf16 rounding still keeps the ranking; at 0.2 the 12 random layers turn chaotic;
figures in results/performance.md), and a classifier head fitted to them (`spread_classifier`): its
output layer reads the direction in which the pooled features of DL19 pairs vary most (their first
principal component; the pairs are from queries after the ones the benchmark times), scaled to a logit
std of 3 with mean 0, which is the range of real cross-encoders' logits.

Decoder rerankers (the Qwen3-Reranker shape) are saved as a "seq-cls" conversion, the form sentence-
transformers' CrossEncoder and `AutoModelForSequenceClassification` load (Qwen3ForSequenceClassification:
the causal LM's layers and a 1-row `score` head read at the last non-pad token, `pad_token_id` set, the
tokenizer padding on the left as Qwen's does); our engine loads the same directory, the `score` row as its
head. The tokenizer is byte-level BPE like Qwen's, trained on the same corpus; the checkpoint names its
prompt template (qwen3-reranker), which every contender applies (`workloads.prompt_pairs`). Its head is
refitted like the encoders' on the features at the prompts' last token; the `score` layer has no bias, so
the logits' mean is whatever the features' mean gives (their spread is still 3).

`RERANKER_CHECKPOINT=<dir>` replaces the random-weight checkpoint of every benchmarked model with that
directory (a real checkpoint in the transformers layout, e.g. a local copy of BAAI/bge-reranker-v2-m3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.datasets import dl19
from pipeline.datasets.tables import collection_dir, default_data_dir
from pipeline.datasets.vaswani import read_documents
from pipeline.datasets.xquad_r import LANGUAGES, read_language
from pipeline.model.decoder_config import DECODER_LAYOUTS
from pipeline.model.decoder_dummy import build_decoder_checkpoint
from pipeline.model.dummy import ARCHITECTURES, DUMMY_MARKER, build_checkpoint

logger = logging.getLogger(__name__)

BENCHMARK_LAYOUT = "xlm_roberta"
# Layouts saved as themselves: their transformers classes are what sentence-transformers loads for them.
OWN_LAYOUTS = ("modernbert", "gte")
TOKENIZER_VOCAB = 32000
REAL_CHECKPOINT_ENV = "RERANKER_CHECKPOINT"
INITIALIZER_RANGE = 0.05
LOGIT_STD = 3.0
HEAD_PAIRS = 64  # DL19 pairs the classifier is fitted on (rows 2,000 and up, 23 queries)
HEAD_MAX_LENGTH = 128
# A decoder's prompt adds ~70 tokens of template to every pair: the head is fitted on whole prompts.
DECODER_HEAD_MAX_LENGTH = 512
DECODER_FORM = "seq_cls"


def tokenizer_corpus(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Every distinct text of the three workloads' sources, in a fixed order (~35k texts, ~6.7 MB)."""
    pairs = dl19(data_dir)
    texts = sorted(set(pairs["document"].to_pylist())) + sorted(set(pairs["query"].to_pylist()))
    texts += list(read_documents(collection_dir(data_dir, "vaswani", ["doc-text.trec"])).values())
    folder = Path(data_dir if data_dir is not None else default_data_dir()) / "xquad-r"
    for lang in LANGUAGES:
        language = read_language(folder, lang)
        texts += list(language.sentences.values()) + [q.text for q in language.questions]
    return texts


def benchmark_checkpoint(
    model: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    tokenizer_vocab: int = TOKENIZER_VOCAB,
    **overrides,
) -> str:
    """The directory of `model`'s benchmark checkpoint (built once, ~30 s, then cached by its recipe).

    `overrides` change the architecture (tests use a small one). `$RERANKER_CHECKPOINT` wins when set.
    """
    real = os.environ.get(REAL_CHECKPOINT_ENV)
    if real:
        if not os.path.isfile(os.path.join(real, "config.json")):
            raise InputError(
                f"{REAL_CHECKPOINT_ENV}={real!r} is not a checkpoint directory (no config.json)"
            )
        return real
    if model not in ARCHITECTURES:
        raise InputError(f"unknown model {model!r}; choose from {sorted(ARCHITECTURES)}")
    overrides = {"initializer_range": INITIALIZER_RANGE, **overrides}
    layout = ARCHITECTURES[model].layout
    decoder = layout in DECODER_LAYOUTS
    arch = replace(
        ARCHITECTURES[model],
        layout=layout if layout in OWN_LAYOUTS or decoder else BENCHMARK_LAYOUT,
        tokenizer_vocab=tokenizer_vocab,
        **overrides,
    )
    corpus = tokenizer_corpus(data_dir)
    head = {
        "logit_std": LOGIT_STD,
        "pairs": HEAD_PAIRS,
        "max_length": DECODER_HEAD_MAX_LENGTH if decoder else HEAD_MAX_LENGTH,
        "fit": "first principal component",
        **({"form": DECODER_FORM} if decoder else {}),
    }
    recipe = json.dumps(
        [asdict(arch), hashlib.sha256("\n".join(corpus).encode()).hexdigest(), head], sort_keys=True
    )
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    root = cache_dir or os.environ.get(
        "RERANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rerank-pipeline")
    )
    target = os.path.join(root, "benchmark", f"{model}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    logger.info(
        "building the %s benchmark checkpoint in %s (tokenizer trained on the workloads' text)",
        model,
        target,
    )
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{model}-")
    if decoder:
        marker = {DUMMY_MARKER: True, "rerank_pipeline_architecture": asdict(arch)}
        build_decoder_checkpoint(
            staging, arch, corpus, "float32", form=DECODER_FORM, config_keys=marker
        )
    else:
        build_checkpoint(staging, arch, corpus, dtype="float32")
    spread_classifier(staging, head_pairs(data_dir), max_length=head["max_length"])
    try:
        os.rename(staging, target)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def head_pairs(
    data_dir: str | os.PathLike | None = None, n: int = HEAD_PAIRS
) -> list[tuple[str, str]]:
    """`n` DL19 pairs spread over its later queries (rows 2,000 and up; the benchmark times the first rows)."""
    pairs = dl19(data_dir)
    rows = range(2000, pairs.num_rows, max(1, (pairs.num_rows - 2000) // n))[:n]
    queries, documents = pairs["query"].to_pylist(), pairs["document"].to_pylist()
    return [(queries[i], documents[i]) for i in rows]


def spread_classifier(
    directory: str,
    pairs: list[tuple[str, str]],
    logit_std: float = LOGIT_STD,
    max_length: int = HEAD_MAX_LENGTH,
) -> dict:
    """Refit the output layer of a transformers-layout checkpoint's classifier head (`classifier.out_proj`, or
    `classifier` itself where the head's other layers have their own names, as in ModernBERT and GTE; a
    decoder's `score` row) so its logits on `pairs` have std `logit_std` and mean 0 (a decoder's `score` has
    no bias: std only), reading the first principal component of the head's pooled features (the tanh of its
    dense layer; a decoder's last-token hidden state) on those pairs, through the checkpoint's prompt for a
    decoder. Rewrites model.safetensors in place; returns {"logit_std", "explained_variance"} (the
    component's share of the features' variance)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.benchmark.workloads import prompt_pairs, prompt_template

    path = os.path.join(directory, "model.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = prompt_template(directory)
    if template is not None:
        pairs = prompt_pairs(template, pairs)
    pooled = []
    if template is not None:  # the score row runs on every position; the model reads the last one
        out_layer, out_name = model.score, "score"
    elif hasattr(model.classifier, "out_proj"):
        out_layer, out_name = model.classifier.out_proj, "classifier.out_proj"
    else:
        out_layer, out_name = model.classifier, "classifier"
    hook = out_layer.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    with torch.inference_mode():
        for start in range(0, len(pairs), 16):
            chunk = pairs[start : start + 16]
            features = tokenizer(
                [q for q, _ in chunk],
                [d for _, d in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            model(**features)
            if (
                template is not None
            ):  # (batch, seq, hidden) -> the last real token's (batch, hidden)
                mask = features["attention_mask"]
                last = (torch.arange(mask.shape[1]) * mask).argmax(-1)
                pooled[-1] = pooled[-1][torch.arange(len(chunk)), last]
    hook.remove()
    features = torch.cat(pooled).double().numpy()  # (pairs, hidden)
    centered = features - features.mean(axis=0)
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)
    direction = vt[0] * np.sign(vt[0].sum() or 1.0)  # (hidden,), a fixed sign
    projected = centered @ direction
    weight = direction * logit_std / projected.std()
    bias = -float(features.mean(axis=0) @ weight)
    state = load_file(path)
    dtype = state[f"{out_name}.weight"].dtype
    state[f"{out_name}.weight"] = torch.from_numpy(weight).reshape(1, -1).to(dtype)
    if f"{out_name}.bias" in state:
        state[f"{out_name}.bias"] = torch.tensor([bias], dtype=dtype)
    save_file(state, path, metadata={"format": "pt"})
    explained = float(singular[0] ** 2 / (singular**2).sum())
    logger.info(
        "classifier head of %s refitted: logit std %.1f on %d pairs, first component %.0f%% of the variance",
        directory,
        logit_std,
        len(pairs),
        100 * explained,
    )
    return {"logit_std": logit_std, "explained_variance": explained}


def stored_dtype(directory: str) -> str | None:
    """The dtype of the checkpoint's floating-point weights on disk ("float32", "bfloat16", ...), read from its
    safetensors headers; None when it has no safetensors file or mixes them (integer buffers don't count)."""
    import glob

    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    dtypes = set()
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="numpy") as f:
            dtypes |= {f.get_slice(key).get_dtype() for key in f.keys()}
    floats = {d for d in dtypes if d.startswith(("F", "BF"))}
    return names.get(floats.pop()) if len(floats) == 1 else None
