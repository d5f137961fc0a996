"""Hold-out check with the real weights, run where RERANKER_CHECKPOINT points to a local copy of
jina-reranker-v2-base-multilingual (no download here): the model card's published example scores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.model import CrossEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from skincare import DOCUMENTS, PUBLISHED_SCORES, QUERY  # noqa: E402

CHECKPOINT = os.environ.get("RERANKER_CHECKPOINT")


@pytest.mark.skipif(
    not CHECKPOINT,
    reason="needs RERANKER_CHECKPOINT=<local jina-reranker-v2-base-multilingual dir>",
)
@pytest.mark.parametrize("dtype,tolerance", [("float32", 2e-3), ("bfloat16", 2e-2)])
def test_model_card_scores(dtype, tolerance):
    model = CrossEncoder.from_pretrained(CHECKPOINT, dtype=dtype)
    assert model.layout == "jina_flash" and not model.is_dummy
    scores = model.compute_score([(QUERY, d) for d in DOCUMENTS], max_length=1024)
    assert scores == pytest.approx(PUBLISHED_SCORES, abs=tolerance)
