"""The benchmark's ModernBERT-shaped checkpoint: its FLOP count (a gated MLP, banded local layers) and a checkpoint
that sentence-transformers' CrossEncoder and our engine both load and score alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.model.flops import Shape, model_flops

CONFIG = {
    "model_type": "modernbert",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "vocab_size": 1000,
    "global_attn_every_n_layers": 3,
    "local_attention": 16,
}


def _by_hand(config: dict, seqlens: list[int], cls_last: bool) -> float:
    """The same count, token by token: GEMM rows per layer and every (query, key) pair its mask lets through."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    every, w = config["global_attn_every_n_layers"], config["local_attention"] // 2
    total = 0.0
    for i in range(layers):
        local = i % every != 0
        last = i == layers - 1 and cls_last
        for n in seqlens:
            queries = 1 if last else n
            index = np.arange(n)
            visible = np.abs(index[:, None] - index[None, :]) <= (w if local else n)
            pairs = visible[:queries].sum()
            # q (queries rows), k and v (n rows), out_proj and the GeGLU MLP (h -> 2f -> h) on the query rows
            total += 2 * (queries * h * h + n * 2 * h * h + queries * (h * h + 3 * h * f))
            total += 4 * h * pairs
    return total + len(seqlens) * 2 * (h * h + h)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_model_flops_count_the_gated_mlp_and_the_band(pooling):
    config = CONFIG | {"classifier_pooling": pooling}
    shape = Shape.from_config(config)
    assert shape.gated and shape.local_layers == (False, True, True, False)
    assert shape.cls_last == (pooling == "cls")
    seqlens = [5, 17, 40, 9]  # shorter than the 17-token band, as long, and longer
    assert model_flops(shape, seqlens) == pytest.approx(
        _by_hand(config, seqlens, cls_last=pooling == "cls"), rel=1e-12
    )


@pytest.mark.slow
def test_modernbert_benchmark_checkpoint_scores_alike_in_sentence_transformers_and_the_engine(
    shared_data, tmp_path
):
    from pipeline.benchmark.checkpoints import benchmark_checkpoint, head_pairs
    from pipeline.benchmark.contenders import EngineContender, SentenceTransformersContender

    directory = benchmark_checkpoint(
        "tiny-modernbert", shared_data, cache_dir=str(tmp_path), tokenizer_vocab=2000
    )
    with open(f"{directory}/config.json") as f:
        assert json.load(f)["model_type"] == "modernbert"
    pairs = head_pairs(shared_data)  # the pairs the head was fitted on
    st = SentenceTransformersContender(directory, 128, "float32").score(pairs, batch_size=8)
    engine = EngineContender(directory, 128, "float32").score(pairs)
    # The refitted head spreads the logits like a real reranker's (std 3 on the pairs it was fitted on).
    assert st.logits.std() == pytest.approx(3.0, rel=1e-3)
    assert np.abs(engine.logits - st.logits).max() <= 1e-4
    assert engine.real_tokens == st.real_tokens
