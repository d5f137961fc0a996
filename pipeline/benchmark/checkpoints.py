"""The checkpoints every contender loads: one directory per architecture, shared by all of them.

Random weights in the shapes of the real rerankers (`pipeline.model.dummy.ARCHITECTURES`), saved in the
stock transformers XLM-RoBERTa layout so sentence-transformers and `AutoModelForSequenceClassification`
load the very same directory our engine loads (jina's flash layout differs only in weight *names*; the
FLOPs are the same). Weights are float32 on disk, like bge-reranker-v2-m3's real checkpoint, so a library
left at its defaults computes in float32, as it would for the real model.

The tokenizer is trained on the workloads' own text (TREC DL 2019 passages and queries, Vaswani
abstracts, XQuAD-R sentences and questions in eight languages) with a 32,000-piece vocabulary: token
counts then come close to a real XLM-R tokenizer's (DL19 pairs: ~96 tokens per pair here; ~84 with an
English WordPiece vocabulary). With the default tiny corpus the tokenizer is near character-level and
every pair would be ~3x longer than in real use.

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

from pipeline.datasets import dl19
from pipeline.datasets.tables import collection_dir, default_data_dir
from pipeline.datasets.vaswani import read_documents
from pipeline.datasets.xquad_r import LANGUAGES, read_language
from pipeline.errors import InputError
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

logger = logging.getLogger(__name__)

BENCHMARK_LAYOUT = "xlm_roberta"
TOKENIZER_VOCAB = 32000
REAL_CHECKPOINT_ENV = "RERANKER_CHECKPOINT"


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


def benchmark_checkpoint(model: str, data_dir: str | os.PathLike | None = None, cache_dir: str | None = None,
                         tokenizer_vocab: int = TOKENIZER_VOCAB, **overrides) -> str:
    """The directory of `model`'s benchmark checkpoint (built once, ~30 s, then cached by its recipe).

    `overrides` change the architecture (tests use a small one). `$RERANKER_CHECKPOINT` wins when set.
    """
    real = os.environ.get(REAL_CHECKPOINT_ENV)
    if real:
        if not os.path.isfile(os.path.join(real, "config.json")):
            raise InputError(f"{REAL_CHECKPOINT_ENV}={real!r} is not a checkpoint directory (no config.json)")
        return real
    if model not in ARCHITECTURES:
        raise InputError(f"unknown model {model!r}; choose from {sorted(ARCHITECTURES)}")
    arch = replace(ARCHITECTURES[model], layout=BENCHMARK_LAYOUT, tokenizer_vocab=tokenizer_vocab, **overrides)
    corpus = tokenizer_corpus(data_dir)
    recipe = json.dumps([asdict(arch), hashlib.sha256("\n".join(corpus).encode()).hexdigest()], sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    root = cache_dir or os.environ.get("RERANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rerank-pipeline"))
    target = os.path.join(root, "benchmark", f"{model}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    logger.info("building the %s benchmark checkpoint in %s (tokenizer trained on the workloads' text)", model, target)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{model}-")
    build_checkpoint(staging, arch, corpus, dtype="float32")
    try:
        os.rename(staging, target)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
