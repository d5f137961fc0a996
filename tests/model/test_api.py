"""The jina-compatible API: compute_score and rerank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.model import CrossEncoder
from pipeline.model.cross_encoder import cpu_auto_dtype, resolve_dtype
from pipeline.model.modeling import SDPA_GROUPED


@pytest.fixture(scope="module")
def encoder(checkpoints):
    return CrossEncoder.from_pretrained(checkpoints["jina_flash"], device="cpu", dtype="float32")


def test_compute_score_shapes_like_jina(encoder, dl19_pairs):
    single = encoder.compute_score(dl19_pairs[0])
    assert isinstance(single, float) and 0 < single < 1
    assert encoder.compute_score([dl19_pairs[0]]) == single
    scores = encoder.compute_score(dl19_pairs[:20])
    assert (
        isinstance(scores, list) and len(scores) == 20 and all(isinstance(s, float) for s in scores)
    )
    # Input order is kept although scoring sorts by length internally.
    reversed_scores = encoder.compute_score(dl19_pairs[:20][::-1])
    assert np.allclose(reversed_scores[::-1], scores, atol=1e-6)
    logits = encoder.compute_score(dl19_pairs[:20], return_logits=True)
    assert np.allclose([1 / (1 + math.exp(-x)) for x in logits], scores, atol=1e-6)
    assert encoder.compute_score([]) == []


def test_compute_score_rejects_non_pairs(encoder):
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]"):
        encoder.compute_score([("q", "d"), ("q", None)])


def test_rerank_best_first_with_max_over_windows(encoder, dl19_pairs):
    query = dl19_pairs[0][0]
    docs = [d for _, d in dl19_pairs[:6]] + [" ".join(d for _, d in dl19_pairs[6:20]), ""]
    result = encoder.rerank(query, docs, max_length=128, max_query_length=32, overlap=16)
    assert sorted(r["index"] for r in result) == list(range(len(docs)))
    scores = [r["relevance_score"] for r in result]
    assert scores == sorted(scores, reverse=True)
    assert all(type(r["index"]) is int and type(r["relevance_score"]) is float for r in result)
    by_index = {r["index"]: r for r in result}
    assert by_index[7]["document"] == ""
    # The long document scores as the best of its windows.
    ids, _, owners = encoder.tokenizer.windows(query, [docs[6]], 128, 32, 16)
    assert len(ids) > 3
    windows = 1 / (1 + np.exp(-encoder.score_tokens(ids).astype(np.float64)))
    assert by_index[6]["relevance_score"] == pytest.approx(windows.max(), abs=1e-6)
    # A document that fits one window scores as compute_score does.
    assert by_index[7]["relevance_score"] == pytest.approx(
        encoder.compute_score((query, ""), max_length=128), abs=1e-6
    )
    assert [
        r["index"]
        for r in encoder.rerank(query, docs, max_length=128, max_query_length=32, top_n=3)
    ] == [r["index"] for r in result[:3]]
    assert encoder.rerank(query, []) == []


def test_rerank_of_a_decoder_scores_each_document_once_through_its_prompt(dl19_pairs):
    """A decoder reranker (Qwen3's layout and prompt) ranks by compute_score's scores: one prompt per
    document, a long one cut to max_length (no windows), best first, ties in input order."""
    encoder = CrossEncoder.from_pretrained("dummy:tiny-qwen3", device="cpu", dtype="float32")
    query = dl19_pairs[0][0]
    docs = [d for _, d in dl19_pairs[:6]] + [" ".join(d for _, d in dl19_pairs[6:20]), ""]
    result = encoder.rerank(query, docs, max_length=256, max_query_length=32, overlap=16)
    assert sorted(r["index"] for r in result) == list(range(len(docs)))
    scores = [r["relevance_score"] for r in result]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 4
    expected = encoder.compute_score([(query, d) for d in docs], max_length=256)
    for r in result:
        assert r["document"] == docs[r["index"]]
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-6)
    long_ids = encoder.tokenizer.encode_pairs([query], [docs[6]], 256)[0][0]
    assert len(long_ids) == 256  # the long document was cut, once, not split into windows
    top = encoder.rerank(query, docs, max_length=256, top_n=3)
    assert [r["index"] for r in top] == [r["index"] for r in result[:3]]
    assert encoder.rerank(query, []) == []


def test_an_instruction_for_a_cross_encoder_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="read without a prompt template.*drop the instruction"):
        CrossEncoder.from_pretrained(
            checkpoints["bert"], device="cpu", dtype="float32", instruction="Find answers"
        )


def test_auto_dtype_and_backend_on_this_cpu():
    expected = cpu_auto_dtype()  # what this machine's GEMM probe chose (remembered per machine)
    assert resolve_dtype(None, torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_describe_reports_backend_and_random_weights(encoder):
    info = encoder.describe()
    assert info["attention_backend"] == SDPA_GROUPED
    assert info["random_weights"] is True and info["layout"] == "jina_flash"


@pytest.mark.slow  # all 4,300 pairs at up to 1,024 tokens through the engine on CPU
def test_scores_all_dl19_passages(dl19_pairs):
    """Done-when of the engine issue: the 4,300 real DL19 pairs score on CPU without error."""
    encoder = CrossEncoder.from_pretrained("dummy:tiny")
    logits = np.asarray(encoder.compute_score(dl19_pairs, return_logits=True))
    assert logits.shape == (4300,) and np.isfinite(logits).all()
    assert logits.std() > 0
