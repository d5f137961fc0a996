"""Pair encoding and truncation match the transformers tokenizer; jina's rerank windows."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.model.tokenization import PairTokenizer, _chunks


@pytest.mark.parametrize("layout", ["jina_flash", "bert"])
def test_pair_encoding_and_truncation_match_transformers(layout, checkpoints, dl19_pairs):
    directory = checkpoints[layout]
    ours = PairTokenizer.from_dir(directory, return_token_types=layout == "bert")
    reference = AutoTokenizer.from_pretrained(directory)
    pairs = dl19_pairs[:60] + [
        (dl19_pairs[0][1] * 5, dl19_pairs[1][1]),
        (dl19_pairs[2][0], dl19_pairs[3][1] * 9),
    ]
    for max_length in (48, 128, 1024):
        ids, types = ours.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], max_length)
        expected = reference(
            [q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=max_length
        )
        assert [x.tolist() for x in ids] == expected["input_ids"]
        if layout == "bert":
            assert [t.tolist() for t in types] == expected["token_type_ids"]
        assert max(len(x) for x in ids) <= max_length
    truncated = sum(
        len(x) == 48 for x in ours.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], 48)[0]
    )
    assert truncated > 10  # the truncation path was really exercised


def test_xlmr_pair_layout(checkpoints):
    ours = PairTokenizer.from_dir(checkpoints["jina_flash"], return_token_types=False)
    ids, types = ours.encode_pairs(["query"], ["document"], 64)
    # <s> q </s></s> d </s>
    tok = ours.tokenizer
    assert ids[0][0] == tok.token_to_id("<s>") and ids[0][-1] == tok.token_to_id("</s>")
    assert (ids[0] == tok.token_to_id("</s>")).sum() == 3
    assert types is None


def test_character_cap_bounds_work_without_changing_the_window(checkpoints, dl19_pairs):
    ours = PairTokenizer.from_dir(checkpoints["jina_flash"], return_token_types=False)
    huge = dl19_pairs[5][1] * 20000  # ~7 MB
    assert len(huge) > 5_000_000
    capped_ids, _ = ours.encode_pairs([dl19_pairs[5][0]], [huge], 1024)
    ours.max_chars_per_token = 10**9  # no cap: the full text is tokenized
    full_ids, _ = ours.encode_pairs([dl19_pairs[5][0]], [huge[:200_000]], 1024)
    assert capped_ids[0].tolist() == full_ids[0].tolist()
    assert len(capped_ids[0]) == 1024


def _jina_windows(tokenizer, query, passages, max_length, max_query_length, overlap_tokens):
    """jina-reranker-v2's reranker_tokenize_preproc (its remote code), restated on a transformers tokenizer."""
    query_inputs = tokenizer(query, truncation=True, max_length=max_query_length)["input_ids"]
    max_passage = max_length - len(query_inputs) - 2
    overlap = min(overlap_tokens, max_passage // 4)
    sep = tokenizer.sep_token_id
    out = []
    for pid, passage in enumerate(passages):
        p = tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(p) <= max_passage:
            out.append((pid, query_inputs + [sep] + p + [sep]))
            continue
        start = 0
        while start < len(p):
            end = start + max_passage
            chunk = p[-max_passage:] if end >= len(p) else p[start:end]
            start = end - overlap if end < len(p) else end
            out.append((pid, query_inputs + [sep] + chunk + [sep]))
    return out


def test_rerank_windows_match_jina(checkpoints, dl19_pairs):
    directory = checkpoints["jina_flash"]
    ours = PairTokenizer.from_dir(directory, return_token_types=False)
    reference = AutoTokenizer.from_pretrained(directory)
    query = dl19_pairs[0][0] * 30  # longer than max_query_length: capped
    docs = [dl19_pairs[1][1], dl19_pairs[2][1] * 7, dl19_pairs[3][1] * 2, "x"]
    ids, _, owners = ours.windows(query, docs, max_length=256, max_query_length=64, overlap=80)
    expected = _jina_windows(reference, query, docs, 256, 64, 80)
    assert owners == [pid for pid, _ in expected]
    assert [x.tolist() for x in ids] == [w for _, w in expected]
    assert owners.count(1) > 2 and all(len(x) <= 256 for x in ids)


def test_chunks_overlap_and_right_aligned_last_window():
    doc = list(range(25))
    chunks = _chunks(doc, window=10, overlap=2)
    assert chunks[0] == list(range(0, 10))
    assert chunks[1] == list(range(8, 18))  # steps by window - overlap
    assert chunks[-1] == list(range(15, 25))  # last window right-aligned and full
    assert all(len(c) == 10 for c in chunks)
    assert _chunks([], 10, 2) == [[]]  # an empty document is one (empty) window
    assert _chunks(list(range(10)), 10, 2) == [list(range(10))]


def test_windows_cover_every_token(checkpoints, dl19_pairs):
    ours = PairTokenizer.from_dir(checkpoints["jina_flash"], return_token_types=False)
    doc = " ".join(d for _, d in dl19_pairs[:30])
    doc_ids = ours.encode_texts([doc])[0]
    chunks = _chunks(doc_ids, 100, 20)
    covered = np.zeros(len(doc_ids), bool)
    pos = 0
    for c in chunks[:-1]:
        covered[pos : pos + len(c)] = True
        pos += len(c) - 20
    covered[-len(chunks[-1]) :] = True
    assert covered.all()
