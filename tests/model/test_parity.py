"""Our packed-sequence model against transformers' own classes on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_logits, sample_pairs
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.model import CrossEncoder
from pipeline.model.dummy import reference_model


def _reference(layout: str, directory: str):
    if layout == "jina_flash":
        # jina's weights cannot be read by transformers' class: rebuild the model they were fused from.
        model = reference_model(directory)
        jina = load_file(f"{directory}/model.safetensors")
        assert torch.equal(
            model.roberta.embeddings.word_embeddings.weight,
            jina["roberta.embeddings.word_embeddings.weight"],
        )
        return model
    return AutoModelForSequenceClassification.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    return sample_pairs(dl19_pairs, seed=0, count=48)


@pytest.mark.parametrize("layout", ["jina_flash", "xlm_roberta", "bert"])
def test_float32_parity(layout, checkpoints, sample):
    directory = checkpoints[layout]
    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    assert ours.layout == layout
    reference = _reference(layout, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    max_length = min(256, ours.max_length)
    expected = reference_logits(reference, tokenizer, sample, max_length)
    got = np.asarray(ours.compute_score(sample, max_length=max_length, return_logits=True))
    assert expected.std() > 0.05, (
        "random logits must differ between pairs for the comparison to mean anything"
    )
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("layout", ["jina_flash", "bert"])
def test_bfloat16_within_reference_error(layout, checkpoints, sample):
    """bf16 error bound: a few times transformers' own bf16 error against its fp32 output."""
    directory = checkpoints[layout]
    reference = _reference(layout, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    fp32 = reference_logits(reference, tokenizer, sample, 256)
    ref_bf16 = reference_logits(reference, tokenizer, sample, 256, dtype=torch.bfloat16)
    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="bfloat16")
    got = np.asarray(ours.compute_score(sample, max_length=256, return_logits=True))
    reference_error = np.abs(ref_bf16 - fp32).max()
    assert reference_error > 0
    assert np.abs(got - fp32).max() <= 3 * reference_error
