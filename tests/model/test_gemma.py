"""bge-reranker-v2-gemma (the Gemma decoder layout): our packed engine against transformers' GemmaForCausalLM.

A tiny random-weight GemmaForCausalLM (tied LM head, one kv head, head_dim unlike hidden / heads, RMSNorm
weights drawn around 0 so that the "+1" matters) saved by transformers, with a SentencePiece-like BPE tokenizer
trained on real text. The reference runs each prompt alone (no padding) and reads logit("Yes") at its last
token, as FlagEmbedding's FlagLLMReranker does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import (
    assert_alone_as_packed,
    assert_cuda_paths_score_as_cpu,
    assert_int8_tracks_float32,
    counted_gemm_flops,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.errors import CheckpointError
from pipeline.model import CrossEncoder
from pipeline.model.decoder_dummy import build_decoder_checkpoint
from pipeline.model.dummy import ARCHITECTURES
from pipeline.model.modeling import FLASH_ATTN, SDPA_GROUPED, TORCH_VARLEN
from pipeline.model.templates import BGE_RERANKER_V2_GEMMA

TINY = replace(ARCHITECTURES["tiny-gemma"], seed=7)
MAX_LENGTH = (
    256  # the prompt alone is ~100 tokens with this small vocabulary: long documents are cut
)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, corpus) -> str:
    return build_decoder_checkpoint(
        str(tmp_path_factory.mktemp("gemma") / "tiny"), TINY, corpus[:800]
    )


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    rng = np.random.default_rng(1)
    picked = [dl19_pairs[i] for i in rng.choice(len(dl19_pairs), 16, replace=False)]
    return picked + [
        (picked[0][0], picked[1][1] * 6),  # the passage is cut
        ("a", "b"),
        (picked[2][1] * 4, picked[3][1]),  # the query alone is over budget: cut, passage dropped
    ]


def _reference(directory: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def _reference_scores(model, ids, yes) -> np.ndarray:
    """logit("Yes") at the last token, each prompt run alone."""
    with torch.inference_mode():
        return np.asarray(
            [
                float(model(torch.as_tensor(x, dtype=torch.int64)[None]).logits[0, -1, yes])
                for x in ids
            ]
        )


def _ids(encoder, pairs, max_length=MAX_LENGTH):
    queries, passages = [q for q, _ in pairs], [d for _, d in pairs]
    return encoder.tokenizer.encode_pairs(queries, passages, max_length)[0]


def test_float32_parity_with_transformers(gemma, sample):
    ours = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    assert ours.layout == "gemma" and ours.describe()["template"] == "bge-reranker-v2-gemma"
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]  # FlagEmbedding's yes_loc
    ids = _ids(ours, sample)
    assert len({len(x) for x in ids}) > 5  # a ragged packed batch
    expected = _reference_scores(_reference(gemma), ids, yes)
    got = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    assert expected.std() > 0.05, "random scores must differ between pairs to compare anything"
    assert np.abs(got - expected).max() <= 1e-4
    # FlagEmbedding's normalize=True: sigmoid of that logit.
    normalized = ours.compute_score(sample[:3], max_length=MAX_LENGTH)
    assert np.abs(np.asarray(normalized) - 1 / (1 + np.exp(-expected[:3]))).max() <= 1e-5


def test_prompt_is_flagembeddings_and_truncation_keeps_the_question(gemma, sample):
    """Untruncated pairs are token for token FlagEmbedding's encoding: BOS, tokenizer("A: " + query),
    tokenizer("\\n"), tokenizer("B: " + passage), tokenizer("\\n"), tokenizer(prompt), each piece alone. A cut
    pair loses the passage's tail (then the query's), never the question: it still ends with it."""
    ours = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gemma)

    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sep, prompt = tok("\n"), tok(BGE_RERANKER_V2_GEMMA.default_instruction)
    suffix = sep + prompt
    budget = MAX_LENGTH - 1 - len(suffix)
    ids = _ids(ours, sample)
    cut = 0
    for (query, passage), got in zip(sample, ids):
        got = list(got)
        body = tok("A: " + query) + sep + tok("B: " + passage)
        assert len(got) <= MAX_LENGTH and got[0] == tokenizer.bos_token_id
        assert got[-len(suffix) :] == suffix
        if len(body) <= budget:
            assert got == [tokenizer.bos_token_id] + body + suffix
        elif (query, passage) != sample[-1]:  # FlagEmbedding's truncation='only_second'
            assert got == [tokenizer.bos_token_id] + body[:budget] + suffix
            cut += 1
    assert cut >= 2
    label = sep + tok("B: ")  # the long query: cut, the passage's label kept, then the question
    last = list(ids[-1])
    assert len(last) == MAX_LENGTH and last[-len(suffix) - len(label) : -len(suffix)] == label
    # The instruction setting replaces FlagEmbedding's default question (its `prompt` argument).
    asked = "Is passage B relevant to query A? Answer 'Yes' or 'No'."
    told = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32", instruction=asked)
    pair = sample[:1]
    assert list(_ids(told, pair)[0][-len(sep + tok(asked)) :]) == sep + tok(asked)
    assert told.compute_score(pair) != ours.compute_score(pair)


def _flagembedding_ids(
    tokenizer, query: str, passage: str, max_length: int, prompt: str
) -> list[int]:
    """FlagLLMReranker's encoding of one pair (FlagEmbedding/inference/reranker/decoder_only/base.py,
    compute_score_single_gpu) written out: the query capped at 3/4 of max_length and the passage at
    max_length, BOS + query and "\n" + passage truncated 'only_second' to max_length + len("\n" + prompt),
    then "\n" and the prompt appended."""

    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    query_ids, passage_ids = tok("A: " + query)[: max_length * 3 // 4], tok("B: " + passage)
    sep, asked = tok("\n"), tok(prompt)
    first, second = [tokenizer.bos_token_id] + query_ids, sep + passage_ids[:max_length]
    room = max_length + len(sep) + len(asked) - len(first)
    assert room > 0  # a query that leaves no room: FlagEmbedding's prepare_for_model would refuse
    return first + second[:room] + sep + asked


def test_a_passage_flagembedding_cuts_is_cut_alike_at_the_same_length(gemma, sample):
    """FlagEmbedding counts lengths otherwise (templates.py), but where it cuts a passage (max_length 60
    here), our encoding at that pair's total length is the same tokens: the passage's tail goes, and
    nothing of the prompt."""
    ours = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    prompt = BGE_RERANKER_V2_GEMMA.default_instruction
    cut = 0
    for query, passage in sample[:-1]:  # not the query longer than FlagEmbedding's 3/4 cap
        expected = _flagembedding_ids(tokenizer, query, passage, 60, prompt)
        length = max(len(expected), ours.tokenizer.prompt.min_length)  # ("a", "b") is shorter
        got = _ids(ours, [(query, passage)], max_length=length)[0]
        assert list(got) == expected
        cut += len(tokenizer("B: " + passage, add_special_tokens=False)["input_ids"]) > 60
    assert cut >= 5


def test_pair_alone_equals_pair_packed(gemma, sample):
    ours = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    assert_alone_as_packed(ours, sample[:4] + sample[-3:], MAX_LENGTH)  # ragged, cut, tiny
    together = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    small = np.asarray(
        ours.compute_score(
            sample, max_length=MAX_LENGTH, return_logits=True, max_tokens_per_batch=300
        )
    )
    assert np.abs(together - small).max() <= 1e-5


def test_bfloat16_within_reference_error(gemma, sample):
    ours32 = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    yes = AutoTokenizer.from_pretrained(gemma).convert_tokens_to_ids("Yes")
    ids = _ids(ours32, sample)
    fp32 = _reference_scores(_reference(gemma), ids, yes)
    ref_bf16 = _reference_scores(_reference(gemma, torch.bfloat16), ids, yes)
    ours = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="bfloat16")
    got = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    reference_error = np.abs(ref_bf16 - fp32).max()
    assert reference_error > 0
    assert np.abs(got - fp32).max() <= 3 * reference_error


@pytest.mark.parametrize(
    "flash_attn, varlen, backend",
    [
        ("ok", "current", FLASH_ATTN),  # flash-attn varlen, causal=True, one kv head for 4 queries
        (None, "current", TORCH_VARLEN),  # torch varlen_attn, window (-1, 0), enable_gqa
        (
            None,
            "no_scale",
            TORCH_VARLEN,
        ),  # torch 2.9's varlen_attn: is_causal, the kv head repeated
        (None, None, SDPA_GROUPED),  # padded causal SDPA groups
    ],
)
def test_cuda_attention_paths_through_standins(
    flash_attn, varlen, backend, gemma, sample, monkeypatch
):
    """The CUDA attention paths with Gemma's multi-query heads, on CPU tensors with the kernels' stand-ins."""
    pairs = sample[:8] + sample[-3:]
    assert_cuda_paths_score_as_cpu(
        gemma, pairs, MAX_LENGTH, flash_attn, varlen, backend, monkeypatch
    )


@pytest.mark.slow  # SmoothQuant's calibration pass, then the int8 run
def test_int8_tracks_float32(gemma, sample):
    """dtype int8: Gemma's Linear layers (named as the encoders') run in int8 on CPU."""
    assert_int8_tracks_float32(gemma, sample, MAX_LENGTH)


def test_config_variants_and_refusals(gemma, tmp_path):
    """What real Gemma configs say loads as transformers reads it: the legacy hidden_act "gelu" (the tanh
    approximation) and no tie_word_embeddings key (tied). The template is known from the model's name. A
    Llama checkpoint (Gemma's weight names) and another activation are refused in one line."""
    pairs = [("capital of france", "paris is the capital of france"), ("a b", "c d e")]
    expected = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32").compute_score(
        pairs, return_logits=True
    )
    local = tmp_path / "bge-reranker-v2-gemma"
    shutil.copytree(gemma, local)
    config = json.loads((local / "config.json").read_text())
    del config["rerank_pipeline_template"], config["tie_word_embeddings"]
    config["hidden_act"] = "gelu"

    def write(**changes):
        (local / "config.json").write_text(json.dumps(config | changes))

    write()
    legacy = CrossEncoder.from_pretrained(str(local), device="cpu", dtype="float32")
    assert legacy.describe()["template"] == "bge-reranker-v2-gemma"
    assert np.abs(np.asarray(legacy.compute_score(pairs, return_logits=True)) - expected).max() == 0
    write(model_type="llama")
    with pytest.raises(CheckpointError, match="model_type='llama'.*only Gemma"):
        CrossEncoder.from_pretrained(str(local), device="cpu")
    write(hidden_act="relu")
    with pytest.raises(CheckpointError, match="hidden_act='relu' is not supported for the gemma"):
        CrossEncoder.from_pretrained(str(local), device="cpu")


def test_template_as_a_json_file_with_pieces(gemma, tmp_path):
    """The template as a JSON file of its fields, pieces as lists: the built-in template's scores."""
    fields = BGE_RERANKER_V2_GEMMA.as_dict()
    fields.pop("name")
    path = tmp_path / "gemma-prompt.json"
    path.write_text(json.dumps(fields))
    assert isinstance(json.loads(path.read_text())["body"], list)
    pairs = [("capital of france", "paris is the capital of france"), ("a b", "c d e")]
    known = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32")
    custom = CrossEncoder.from_pretrained(gemma, device="cpu", dtype="float32", template=str(path))
    assert custom.describe()["template"] == "gemma-prompt.json"
    assert custom.compute_score(pairs) == known.compute_score(pairs)


def test_model_flops_count_gemmas_linear_layers(gemma):
    """The FLOPs formula (dry-run estimates, MFU) for Gemma: its Linear layers' count equals what torch's flop
    counter sees the model multiply (4 query heads of 32 and one kv head, GeGLU, the last token alone)."""
    gemms, shape, linear, _ = counted_gemm_flops(gemma)
    assert shape.decoder and shape.query_width == 128 and shape.kv_width == 32
    assert gemms == linear
