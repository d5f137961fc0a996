"""Tiny random-weight checkpoints in every layout, with tokenizers trained on real text (no downloads)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

TINY = {
    # Wide init so random logits differ between pairs: parity must compare real numbers, not a constant.
    "jina_flash": replace(
        ARCHITECTURES["tiny"], layout="jina_flash", initializer_range=0.2, seed=1
    ),
    "xlm_roberta": replace(
        ARCHITECTURES["tiny"],
        layout="xlm_roberta",
        initializer_range=0.2,
        seed=2,
        max_position_embeddings=514,
    ),
    "bert": replace(
        ARCHITECTURES["tiny"],
        layout="bert",
        initializer_range=0.2,
        seed=3,
        max_position_embeddings=512,
    ),
}


@pytest.fixture(scope="session")
def dl19_pairs(shared_data) -> list[tuple[str, str]]:
    """The 4,300 real (query, passage) pairs of TREC DL 2019's BM25 top-100."""
    with open(shared_data / "trec-dl" / "retrieve_results_dl19.json") as f:
        topics = json.load(f)
    return [(t["query"], hit["content"]) for t in topics for hit in t["hits"]]


@pytest.fixture(scope="session")
def corpus(dl19_pairs, shared_data) -> list[str]:
    texts = [d for _, d in dl19_pairs[:1500]] + sorted({q for q, _ in dl19_pairs})
    for lang in ("de", "ru", "zh", "ar", "th", "hi"):
        with open(shared_data / "xquad-r" / f"{lang}.json") as f:
            data = json.load(f)
        texts += [
            s for article in data["data"][:2] for p in article["paragraphs"] for s in p["sentences"]
        ][:100]
    return texts


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, corpus) -> dict[str, str]:
    """layout -> directory of a tiny float32 checkpoint in that layout."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        layout: build_checkpoint(str(root / layout), arch, corpus) for layout, arch in TINY.items()
    }
