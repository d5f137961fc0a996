"""Qwen3-Reranker (and Qwen2) decoder rerankers: our packed engine against transformers' own Qwen classes.

Tiny random-weight checkpoints saved by transformers (Qwen3ForCausalLM with tied or separate LM head, the
converted seq-cls form, Qwen2ForCausalLM) with a byte-level BPE tokenizer trained on real text. The reference
runs each prompt alone (no padding) and reads logit(yes) - logit(no) at its last token.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import (
    assert_cuda_paths_score_as_cpu,
    assert_int8_tracks_float32,
    counted_gemm_flops,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model import CrossEncoder
from pipeline.model.decoder_dummy import build_decoder_checkpoint
from pipeline.model.dummy import ARCHITECTURES
from pipeline.model.flops import linear_and_attention_flops, linear_flops_per_token
from pipeline.model.modeling import FLASH_ATTN, SDPA_GROUPED, TORCH_VARLEN
from pipeline.model.templates import QWEN3_RERANKER

TINY = replace(ARCHITECTURES["tiny-qwen3"], seed=5)
FORMS = {
    # name: (layout, form, tied LM head)
    "qwen3_tied": ("qwen3", "causal_lm", True),
    "qwen3_lm_head": ("qwen3", "causal_lm", False),
    "qwen3_seq_cls": ("qwen3", "seq_cls", False),
    "qwen2": ("qwen2", "causal_lm", False),
}
MAX_LENGTH = (
    448  # the template alone is ~130 tokens with this small vocabulary: long documents are cut
)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, corpus) -> dict[str, str]:
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for name, (layout, form, tied) in FORMS.items():
        arch = replace(TINY, layout=layout, head_dim=None if layout == "qwen2" else TINY.head_dim)
        out[name] = build_decoder_checkpoint(
            str(root / name), arch, corpus[:800], form=form, tie_word_embeddings=tied
        )
    return out


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    rng = np.random.default_rng(0)
    picked = [dl19_pairs[i] for i in rng.choice(len(dl19_pairs), 20, replace=False)]
    return picked + [
        (picked[0][0], picked[1][1] * 6),  # the document is cut
        ("a", "b"),
        (picked[2][1] * 4, picked[3][1]),  # the query alone is over budget: cut, document dropped
    ]


def _reference(directory: str, form: str, dtype=torch.float32):
    cls = AutoModelForCausalLM if form == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(directory, dtype=dtype).eval()


def _reference_scores(model, form, ids, yes, no) -> np.ndarray:
    """logit(yes) - logit(no) at the last token (the seq-cls head's logit), each prompt run alone."""
    out = []
    with torch.inference_mode():
        for x in ids:
            logits = model(torch.as_tensor(x, dtype=torch.int64)[None]).logits[0].float()
            out.append(logits[-1, yes] - logits[-1, no] if form == "causal_lm" else logits[0])
    return np.asarray([float(v) for v in out])


def _ids(encoder, pairs, max_length=MAX_LENGTH):
    return encoder.tokenizer.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], max_length)[
        0
    ]


@pytest.mark.parametrize("name", list(FORMS))
def test_float32_parity_with_transformers(name, decoders, sample):
    layout, form, _ = FORMS[name]
    directory = decoders[name]
    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    assert ours.layout == layout
    tokenizer = AutoTokenizer.from_pretrained(directory)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    ids = _ids(ours, sample)
    assert len({len(x) for x in ids}) > 5  # a ragged packed batch
    expected = _reference_scores(_reference(directory, form), form, ids, yes, no)
    got = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    assert expected.std() > 0.05, "random scores must differ between pairs to compare anything"
    assert np.abs(got - expected).max() <= 1e-4
    if form == "causal_lm":
        # sigmoid(logit(yes) - logit(no)) is the reference's softmax over the two answer tokens.
        model = _reference(directory, form)
        with torch.inference_mode():
            last = model(torch.as_tensor(ids[0], dtype=torch.int64)[None]).logits[0, -1]
        softmax_yes = torch.softmax(last[[no, yes]].double(), dim=0)[1].item()
        assert abs(ours.compute_score(sample[0], max_length=MAX_LENGTH) - softmax_yes) <= 1e-6


def test_prompt_is_the_model_cards_and_truncation_keeps_the_suffix(decoders, sample):
    """Untruncated pairs are token for token the Qwen3-Reranker model card's encoding (prefix and suffix
    alone, the formatted body as one text); a cut pair loses the document's tail (then the query's), never
    the template: it still ends with the suffix, where the model answers."""
    directory = decoders["qwen3_tied"]
    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    t = QWEN3_RERANKER
    prefix = tokenizer.encode(t.prefix, add_special_tokens=False)
    suffix = tokenizer.encode(t.suffix, add_special_tokens=False)
    budget = MAX_LENGTH - len(prefix) - len(suffix)
    label = tokenizer.encode("\n<Document>: ", add_special_tokens=False)
    ids = _ids(ours, sample)
    for (query, document), got in zip(sample, ids):
        body = t.body.format(instruction=t.default_instruction, query=query, document=document)
        full = tokenizer(body, add_special_tokens=False)["input_ids"]
        got = list(got)
        assert len(got) <= MAX_LENGTH and got[: len(prefix)] == prefix
        assert got[-len(suffix) :] == suffix
        if len(full) <= budget:
            assert got == prefix + full + suffix
        elif (query, document) != sample[-1]:
            assert got == prefix + full[:budget] + suffix  # the model card's truncation
    cut = list(ids[-1])  # the long query: cut, the document label kept, then the suffix
    assert len(cut) == MAX_LENGTH and cut[-len(suffix) - len(label) : -len(suffix)] == label


def test_pair_alone_equals_pair_packed(decoders, sample):
    ours = CrossEncoder.from_pretrained(decoders["qwen3_tied"], device="cpu", dtype="float32")
    together = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    small = np.asarray(
        ours.compute_score(
            sample, max_length=MAX_LENGTH, return_logits=True, max_tokens_per_batch=400
        )
    )
    for i in (0, 7, len(sample) - 3, len(sample) - 1):
        alone = ours.compute_score([sample[i]], max_length=MAX_LENGTH, return_logits=True)
        assert abs(alone - together[i]) <= 1e-5
    assert np.abs(together - small).max() <= 1e-5
    assert len(set(np.round(together, 4))) > 10


def test_bfloat16_within_reference_error(decoders, sample):
    directory = decoders["qwen3_lm_head"]
    ours32 = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    ids = _ids(ours32, sample)
    fp32 = _reference_scores(_reference(directory, "causal_lm"), "causal_lm", ids, yes, no)
    ref_bf16 = _reference_scores(
        _reference(directory, "causal_lm", torch.bfloat16), "causal_lm", ids, yes, no
    )
    ours = CrossEncoder.from_pretrained(directory, device="cpu", dtype="bfloat16")
    got = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    reference_error = np.abs(ref_bf16 - fp32).max()
    assert reference_error > 0
    assert np.abs(got - fp32).max() <= 3 * reference_error


@pytest.mark.parametrize(
    "flash_attn, varlen, backend",
    [
        ("ok", "current", FLASH_ATTN),  # flash-attn varlen, causal=True, grouped-query heads
        (None, "current", TORCH_VARLEN),  # torch varlen_attn, window (-1, 0), enable_gqa
        (None, "no_scale", TORCH_VARLEN),  # torch 2.9's varlen_attn: is_causal, kv heads repeated
        (None, None, SDPA_GROUPED),  # padded causal SDPA groups
    ],
)
def test_cuda_attention_paths_through_standins(
    flash_attn, varlen, backend, decoders, sample, monkeypatch
):
    """The CUDA attention paths, run on CPU tensors with the kernels' stand-ins."""
    assert_cuda_paths_score_as_cpu(
        decoders["qwen3_tied"], sample, MAX_LENGTH, flash_attn, varlen, backend, monkeypatch
    )


@pytest.mark.slow  # SmoothQuant's calibration pass, then the int8 run: 35 s on the loaded 2-core machine
def test_int8_tracks_float32(decoders, sample):
    """dtype int8: the decoder's Linear layers (named as the encoders') run in int8 on CPU."""
    assert_int8_tracks_float32(decoders["qwen3_lm_head"], sample, MAX_LENGTH)


def test_template_errors_and_custom_template(decoders, checkpoints, tmp_path):
    directory = decoders["qwen3_tied"]
    config_path = f"{directory}/config.json"
    with open(config_path) as f:
        config = json.load(f)
    unknown = tmp_path / "my-decoder"
    unknown.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (unknown / name).write_bytes(open(f"{directory}/{name}", "rb").read())
    config.pop("rerank_pipeline_template")
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="prompt template is not known.*tokenizer.template"):
        CrossEncoder.from_pretrained(str(unknown), device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        CrossEncoder.from_pretrained(str(unknown), device="cpu", template="nope")
    with pytest.raises(ConfigError, match="cross-encoder"):
        CrossEncoder.from_pretrained(checkpoints["bert"], device="cpu", template="qwen3-reranker")
    # The template as a JSON file of its fields; an instruction of the job's own changes the scores.
    fields = QWEN3_RERANKER.as_dict()
    fields.pop("name")
    (tmp_path / "prompt.json").write_text(json.dumps(fields))
    custom = CrossEncoder.from_pretrained(
        str(unknown), device="cpu", dtype="float32", template=str(tmp_path / "prompt.json")
    )
    known = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    pairs = [("capital of france", "paris is the capital of france")]
    assert custom.compute_score(pairs) == known.compute_score(pairs)
    told = CrossEncoder.from_pretrained(
        directory, device="cpu", dtype="float32", instruction="Find recipes"
    )
    assert told.describe()["instruction"] == "Find recipes"
    assert told.compute_score(pairs) != known.compute_score(pairs)


def test_rotary_positions_restart_per_sequence(decoders, sample, monkeypatch):
    """Each packed sequence's rotary positions count from 0, as the reference numbers a prompt run alone.
    Rotary attention depends on position differences only, so a wrong offset shows in the scores just
    through rounding at large positions (1.4e-5 here in float32, caught by batch invariance barely): hence
    this direct check of the positions the model rotates by."""
    from pipeline.model import decoder

    seen = []
    original = decoder.rotary_tables
    monkeypatch.setattr(
        decoder,
        "rotary_tables",
        lambda positions, *args: seen.append(positions.clone()) or original(positions, *args),
    )
    ours = CrossEncoder.from_pretrained(decoders["qwen3_tied"], device="cpu", dtype="float32")
    ids = _ids(ours, sample[:6])
    ours.score_tokens(ids)
    assert len(seen) == 1
    expected = torch.cat([torch.arange(len(x)) for x in sorted(ids, key=len, reverse=True)])
    assert torch.equal(seen[0], expected)


def test_model_flops_count_the_decoders_linear_layers(decoders):
    """The FLOPs formula (dry-run estimates, MFU) for a decoder: its Linear layers' count equals what torch's
    flop counter sees the model multiply (grouped-query widths, SwiGLU, the last token alone, one-row head)."""
    gemms, shape, linear, attention = counted_gemm_flops(decoders["qwen3_lm_head"])
    assert shape.decoder and gemms == linear
    assert attention == 4 * shape.query_width * (
        (TINY.num_hidden_layers - 1) * sum(n * (n + 1) / 2 for n in (37, 64, 90)) + (37 + 64 + 90)
    )
    # The per-token figure the benchmark sizes its pairs by is the same Linear layers, every layer run whole.
    whole, _ = linear_and_attention_flops(replace(shape, cls_last=False), [37, 64, 90])
    assert linear_flops_per_token(shape) * (37 + 64 + 90) + 3 * 2 * shape.hidden == whole
