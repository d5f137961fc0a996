"""Benchmark workloads: real text in the rerank job's long format, sized by `n_pairs`.

- `dl19`: the 4,300 TREC DL 2019 BM25 pairs (short passages, ~84 tokens per pair on average);
- `long`: Vaswani queries against BM25's candidates, each candidate abstract followed by the abstracts after it
  in the collection until a target length drawn uniformly from [min_tokens, max_tokens] (a long-document
  mix; pairs are truncated to the model's limit by the job, not here);
- `multilingual`: XQuAD-R questions in eight languages and five scripts (Arabic, Devanagari, Latin, Cyrillic,
  Thai, Han) against the sentences of their article in the question's language.

Every workload is deterministic: the same arguments give the same table, row for row. `n_pairs` cuts the
table to its first rows or tiles it (tiled query ids get `#1`, `#2`, ..., see `take_pairs`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets.tables import collection_dir, take_pairs
from pipeline.datasets.trec_dl import trec_dl
from pipeline.datasets.vaswani import read_documents, vaswani
from pipeline.datasets.xquad_r import LANGUAGES, xquad_r

# Subword tokenizers (WordPiece, XLM-R's SentencePiece) cut this English text into ~1.3 tokens per word.
TOKENS_PER_WORD = 1.3
NUM_PARTS = "num_parts"  # extra column of `long`: how many abstracts a document joins


def estimate_tokens(text: str) -> int:
    """A tokenizer-free length estimate; pass a real tokenizer's count to `long` where exact lengths matter."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def dl19(data_dir: str | os.PathLike | None = None, n_pairs: int | None = None) -> pa.Table:
    """The TREC DL 2019 BM25 top-100 pairs (4,300 rows, 43 queries), with first-stage columns."""
    pairs, _ = trec_dl(2019, data_dir)
    return take_pairs(pairs, n_pairs)


def long(
    data_dir: str | os.PathLike | None = None,
    n_pairs: int | None = None,
    depth: int = 100,
    min_tokens: int = 300,
    max_tokens: int = 1000,
    count_tokens: Callable[[str], int] | None = None,
    seed: int = 0,
) -> pa.Table:
    """Vaswani's BM25 top-`depth` pairs (93 x `depth` rows) with each document grown to a target length.

    Document i of a query: its candidate abstract, then abstracts i+1, i+2, ... in collection order (wrapping
    around), joined by blank lines, until `count_tokens` (default `estimate_tokens`) reaches the target (an
    abstract that would push a document already past `min_tokens` beyond `max_tokens` is left out). The
    target of every pair is drawn once from a generator seeded with `seed`. doc_id stays the candidate's
    docno, so Vaswani's qrels still apply to the head abstract. Extra column: `num_parts` (int32).
    """
    if not 1 <= min_tokens <= max_tokens:
        raise InputError(
            f"long workload: need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}"
        )
    count = count_tokens or estimate_tokens
    pairs, _ = vaswani(data_dir, depth=depth)
    if n_pairs is not None and n_pairs <= pairs.num_rows:
        pairs = pairs.slice(0, n_pairs)  # grow only the rows we return
    folder = collection_dir(data_dir, "vaswani", ["doc-text.trec"])
    docs = read_documents(folder)
    docnos, texts = list(docs), list(docs.values())
    position = {docno: i for i, docno in enumerate(docnos)}
    lengths: dict[int, int] = {}  # token counts per abstract, computed on first use

    def length(i: int) -> int:
        if i not in lengths:
            lengths[i] = count(texts[i])
        return lengths[i]

    targets = np.random.default_rng(seed).integers(min_tokens, max_tokens + 1, size=pairs.num_rows)
    documents, parts = [], []
    for doc_id, target in zip(pairs[schema.DOC_ID].to_pylist(), targets):
        start = position[doc_id]
        chosen, total = [], 0
        while total < target and len(chosen) < len(texts):
            i = (start + len(chosen)) % len(texts)
            if total >= min_tokens and total + length(i) > max_tokens:
                break  # long enough already, and this abstract would overshoot the range
            chosen.append(i)
            total += length(i)
        documents.append("\n\n".join(texts[i] for i in chosen))
        parts.append(len(chosen))
    index = pairs.schema.get_field_index(schema.DOCUMENT)
    pairs = pairs.set_column(index, schema.DOCUMENT, pa.array(documents, pa.string()))
    pairs = pairs.append_column(pa.field(NUM_PARTS, pa.int32()), pa.array(parts, pa.int32()))
    return take_pairs(pairs, n_pairs)


def multilingual(
    data_dir: str | os.PathLike | None = None,
    n_pairs: int | None = None,
    languages: Sequence[str] = LANGUAGES,
) -> pa.Table:
    """XQuAD-R questions of `languages`, interleaved (every prefix mixes the scripts), each against the
    sentences of its article in its own language: 1,190 questions x 8 languages, 234,380 rows in all."""
    pairs, _ = xquad_r(data_dir, languages=languages)
    return take_pairs(pairs, n_pairs)


WORKLOADS: dict[str, Callable[..., pa.Table]] = {
    "dl19": dl19,
    "long": long,
    "multilingual": multilingual,
}


def describe(pairs: pa.Table) -> dict:
    """Row and query counts and document length (whitespace words): a line for benchmark logs."""
    words = pc.list_value_length(pc.utf8_split_whitespace(pairs[schema.DOCUMENT])).to_numpy()
    return {
        "pairs": pairs.num_rows,
        "queries": len(pc.unique(pairs[schema.QUERY_ID])),
        "document_words_mean": float(words.mean()) if len(words) else 0.0,
        "document_words_max": int(words.max()) if len(words) else 0,
    }
