"""Real DL19 candidates scored by a real, cheap, deterministic scorer: BM25 over the candidate passages.

The selection is model-agnostic (it reads a `score` column), so a lexical scorer exercises it on real text
and real judgements; the cross-encoder path is covered by the job's end-to-end test.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.datasets import trec_dl
from pipeline.datasets.bm25 import BM25

DL19_MIN_POSITIVE_LABEL = 2  # TREC DL passage: relevance 2 ("highly relevant") and 3 ("perfectly relevant")


def bm25_scores(pairs: pa.Table) -> np.ndarray:
    """BM25 (k1=0.9, b=0.4) of each pair's document for its query, over the table's distinct passages. -> (n,) float32"""
    doc_ids = pairs[schema.DOC_ID].to_pylist()
    texts = dict(zip(doc_ids, pairs[schema.DOCUMENT].to_pylist()))
    index_of = {doc_id: i for i, doc_id in enumerate(texts)}
    bm25 = BM25(list(texts.values()))
    by_query: dict[str, np.ndarray] = {}
    scores = np.empty(pairs.num_rows, dtype=np.float32)
    for row, (qid, query, doc_id) in enumerate(zip(pairs[schema.QUERY_ID].to_pylist(),
                                                   pairs[schema.QUERY].to_pylist(), doc_ids)):
        if qid not in by_query:
            by_query[qid] = bm25.scores(query)
        scores[row] = by_query[qid][index_of[doc_id]]
    return scores


@pytest.fixture(scope="session")
def dl19(shared_data) -> tuple[pa.Table, pa.Table]:
    """(scored candidates, qrels): the 4,300 DL19 pairs with `score` = BM25 as float32, and the NIST qrels."""
    pairs, qrels = trec_dl(2019, shared_data)
    return pairs.append_column(schema.SCORE, pa.array(bm25_scores(pairs), pa.float32())), qrels
