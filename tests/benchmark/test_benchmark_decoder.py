"""The benchmark's decoder reranker: a Qwen3 seq-cls checkpoint that our engine, sentence-transformers'
CrossEncoder and transformers all load and score alike on the same prompts, and the max_length check that
keeps every contender's input the same."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.model.dummy import ARCHITECTURES, DEFAULT_CORPUS

# Edge cases of the prompt's split: a document that starts with a space, line breaks in both texts, an empty
# document, non-Latin text.
PAIRS = [
    ("what is the capital of germany?", "Die Hauptstadt von Deutschland ist Berlin."),
    ("x", " leading space doc"),
    ("query\nover two lines", "doc\n\nwith lines  and   spaces"),
    ("empty document", ""),
    ("中国的首都", "中国的首都是北京，一个历史悠久的城市。"),
]
LENGTH = 4096  # no prompt is truncated (the libraries cut prompts differently from the engine)


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory, shared_data):
    """A tiny Qwen3 seq-cls checkpoint as the benchmark saves one, its head refitted on DL19 prompts."""
    from pipeline.benchmark.checkpoints import head_pairs, spread_classifier
    from pipeline.model.decoder_dummy import build_decoder_checkpoint

    directory = str(tmp_path_factory.mktemp("qwen3-seq-cls"))
    pairs = head_pairs(shared_data, 16)
    # Trained on the fitting pairs' text too: their prompts then take hundreds of tokens, not thousands.
    corpus = DEFAULT_CORPUS + [text for pair in pairs for text in pair]
    build_decoder_checkpoint(
        directory, ARCHITECTURES["tiny-qwen3"], corpus, "float32", form="seq_cls"
    )
    fit = spread_classifier(directory, pairs, max_length=LENGTH)
    return directory, fit


def test_the_libraries_prompt_pairs_tokenize_to_the_engines_prompt(seq_cls):
    from transformers import AutoTokenizer

    from pipeline.benchmark.workloads import pair_token_counts, prompt_pairs, prompt_template
    from pipeline.model.tokenization import PairTokenizer

    directory, _ = seq_cls
    template = prompt_template(directory)
    assert template.name == "qwen3-reranker"
    formatted = prompt_pairs(template, PAIRS)
    # The model card's split: the query side ends at the line break before the document's line.
    assert formatted[0][0].endswith("<Query>: what is the capital of germany?\n")
    assert formatted[0][1].startswith("<Document>: Die") and formatted[0][1].endswith(
        template.suffix
    )
    library = AutoTokenizer.from_pretrained(directory)(
        [a for a, _ in formatted], [b for _, b in formatted]
    )["input_ids"]
    engine, _ = PairTokenizer.from_dir(
        directory, return_token_types=False, prompt=template
    ).encode_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS], LENGTH)
    assert [list(ids) for ids in engine] == library
    # The benchmark's token counts (FLOPs, the Ray job's tokens) are the prompt's.
    assert list(pair_token_counts(directory, PAIRS, LENGTH)) == [len(ids) for ids in library]


def test_engine_sentence_transformers_and_transformers_score_the_seq_cls_checkpoint_alike(
    seq_cls, shared_data
):
    from pipeline.benchmark.checkpoints import head_pairs
    from pipeline.benchmark.contenders import (
        EngineContender,
        SentenceTransformersContender,
        TransformersContender,
    )
    from pipeline.model.flops import Shape

    directory, fit = seq_cls
    with open(f"{directory}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["pad_token_id"] is not None and len(config["id2label"]) == 1
    assert Shape.from_config(config).decoder  # MFU counts it as a decoder (flops.py)
    pairs = head_pairs(shared_data, 16)  # the pairs the head was fitted on, of ragged lengths
    engine = EngineContender(directory, LENGTH, "float32").score(pairs)
    # The refitted score row spreads the logits like a real reranker's (std 3 on its fitting pairs).
    assert engine.logits.std() == pytest.approx(fit["logit_std"], rel=1e-3)
    st = SentenceTransformersContender(directory, LENGTH, "float32").score(pairs, batch_size=4)
    padded = TransformersContender(directory, LENGTH, "float32", length_sorted=False)
    assert (
        padded.tokenizer.padding_side == "left"
    )  # as Qwen's tokenizer; the head reads the last token
    for other in (
        st,
        padded.score(pairs, batch_size=4),
        TransformersContender(directory, LENGTH, "float32", length_sorted=True).score(pairs, 4),
    ):
        assert np.abs(other.logits - engine.logits).max() <= 1e-4
        assert other.real_tokens == engine.real_tokens  # the same prompts, none truncated
        assert other.processed_tokens > other.real_tokens  # padded batches of ragged prompts


def test_a_max_length_that_would_truncate_a_decoders_prompt_is_refused_naming_the_length(seq_cls):
    from pipeline.benchmark.runner import check_untruncated
    from pipeline.benchmark.workloads import untruncated_token_counts
    from pipeline.core.errors import InputError

    directory, _ = seq_cls
    longest = int(untruncated_token_counts(directory, PAIRS).max())
    check_untruncated(directory, "dl19", PAIRS, longest)  # every prompt fits: no error
    with pytest.raises(InputError, match=rf"truncate \d of the 5 dl19 pairs.*max_length={longest}"):
        check_untruncated(directory, "dl19", PAIRS, longest - 1)


def test_optional_backends_are_skipped_on_decoders(seq_cls):
    from pipeline.benchmark.contenders import load_contender

    directory, _ = seq_cls
    with pytest.raises(ValueError, match="not benchmarked on decoder rerankers"):
        load_contender("ort-fp32", directory, max_length=1024)
