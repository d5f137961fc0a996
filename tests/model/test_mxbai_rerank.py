"""mxbai-rerank-v2's prompt on the Qwen2 decoder layout: pairs are encoded token for token as mixedbread's own
code does (mxbai_rerank/mxbai_rerank_v2.py, `MxbaiRerankV2.prepare_inputs`, written out below on
transformers' fast tokenizer), cut pairs keep the task prompt and the chat suffix, and the engine's score is
transformers' Qwen2ForCausalLM logit("1") - logit("0") at the prompt's last token."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pipeline.model import CrossEncoder
from pipeline.model.decoder_dummy import TEMPLATE_KEY, build_decoder_checkpoint
from pipeline.model.dummy import ARCHITECTURES
from pipeline.model.templates import MXBAI_RERANK_V2, resolve_template

TINY_QWEN2 = replace(ARCHITECTURES["tiny-qwen3"], layout="qwen2", head_dim=None, seed=7)
MAX_LENGTH = (
    448  # the template alone is ~160 tokens with this small vocabulary: long documents are cut
)
TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your "
    "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus) -> str:
    directory = tmp_path_factory.mktemp("mxbai") / "mxbai-rerank-tiny-v2"
    return build_decoder_checkpoint(
        str(directory), TINY_QWEN2, corpus[:800], template="mxbai-rerank-v2"
    )


def reference_tokenizer(checkpoint: str) -> PreTrainedTokenizerFast:
    """transformers' tokenizer on the checkpoint's tokenizer.json, as mxbai's AutoTokenizer is on a real
    checkpoint. (AutoTokenizer here would build Qwen2Tokenizer from config.json's model type, with Qwen2's own
    pre-tokenizer in place of the tiny checkpoint's.)"""
    return PreTrainedTokenizerFast(tokenizer_file=f"{checkpoint}/tokenizer.json")


@pytest.fixture(scope="module")
def sample(dl19_pairs):
    rng = np.random.default_rng(1)
    picked = [dl19_pairs[i] for i in rng.choice(len(dl19_pairs), 12, replace=False)]
    return picked + [(picked[0][0], picked[1][1] * 6), ("a", "")]  # a cut document, an empty one


def mxbai_ids(tokenizer, query: str, document: str, instruction: str | None = None) -> list[int]:
    """mxbai's `prepare_inputs` and `concat_input_ids` for one pair that fits (no truncation)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    query_text = f"query: {query}"
    if instruction:
        query_text = f"instruction: {instruction}\n{query_text}"
    sep = ids("\n")
    body = ids(query_text) + sep + ids(f"document: {document}")
    return ids(PREFIX) + body + sep + ids(TASK) + ids(SUFFIX)


def test_template_is_mxbais_published_prompt():
    assert (MXBAI_RERANK_V2.yes_token, MXBAI_RERANK_V2.no_token) == ("1", "0")
    assert MXBAI_RERANK_V2.prefix == PREFIX and MXBAI_RERANK_V2.suffix == ("\n", TASK, SUFFIX)
    assert MXBAI_RERANK_V2.default_instruction == ""


def test_pairs_are_encoded_as_mxbai_does_and_cut_pairs_keep_the_suffix(checkpoint, sample):
    tokenizer = reference_tokenizer(checkpoint)
    ours = CrossEncoder.from_pretrained(checkpoint, device="cpu", dtype="float32")
    assert ours.layout == "qwen2" and ours.tokenizer.prompt.template.name == "mxbai-rerank-v2"
    assert ours.tokenizer.prompt.answer_ids == (
        tokenizer.convert_tokens_to_ids("1"),
        tokenizer.convert_tokens_to_ids("0"),
    )
    ids = ours.tokenizer.encode_pairs([q for q, _ in sample], [d for _, d in sample], MAX_LENGTH)[0]
    suffix = (
        tokenizer("\n")["input_ids"] + tokenizer(TASK)["input_ids"] + tokenizer(SUFFIX)["input_ids"]
    )
    whole = 0
    for (query, document), got in zip(sample, ids):
        expected = mxbai_ids(tokenizer, query, document)
        if len(expected) <= MAX_LENGTH:
            assert list(got) == expected
            whole += 1
        else:  # the document's tail is cut; the task prompt and the chat suffix stay
            assert len(got) == MAX_LENGTH and list(got[-len(suffix) :]) == suffix
            assert list(got[: MAX_LENGTH - len(suffix)]) == expected[: MAX_LENGTH - len(suffix)]
    assert whole >= 8 and whole < len(sample)

    # An instruction is read as mxbai reads it when given with its label and newline.
    told = CrossEncoder.from_pretrained(
        checkpoint, device="cpu", dtype="float32", instruction="instruction: Find answers\n"
    )
    query, document = sample[2]
    got = told.tokenizer.encode_pairs([query], [document], MAX_LENGTH)[0][0]
    assert list(got) == mxbai_ids(tokenizer, query, document, instruction="Find answers")


def test_scores_are_qwen2s_logit_1_minus_logit_0(checkpoint, sample):
    ours = CrossEncoder.from_pretrained(checkpoint, device="cpu", dtype="float32")
    tokenizer = reference_tokenizer(checkpoint)
    yes, no = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0")
    ids = ours.tokenizer.encode_pairs([q for q, _ in sample], [d for _, d in sample], MAX_LENGTH)[0]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = []
    with torch.inference_mode():  # each prompt alone, unpadded
        for x in ids:
            last = model(torch.as_tensor(x, dtype=torch.int64)[None]).logits[0, -1]
            expected.append(float(last[yes] - last[no]))
    expected = np.asarray(expected)
    got = np.asarray(ours.compute_score(sample, max_length=MAX_LENGTH, return_logits=True))
    assert expected.std() > 0.05 and np.abs(got - expected).max() <= 1e-4


def test_known_by_its_hub_name(checkpoint, tmp_path):
    unnamed = tmp_path / "unnamed"
    shutil.copytree(checkpoint, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config[TEMPLATE_KEY]
    (unnamed / "config.json").write_text(json.dumps(config))
    for name in ("mixedbread-ai/mxbai-rerank-base-v2", "mixedbread-ai/mxbai-rerank-large-v2"):
        assert resolve_template(None, name, str(unnamed), "qwen2") is MXBAI_RERANK_V2
