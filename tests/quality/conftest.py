"""Fixtures of the index-quality tests: the real TREC DL 2019 candidates as the rerank job's Parquet input,
(the S3 server fixtures live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.datasets import trec_dl


@pytest.fixture(scope="session")
def dl19_qrels(shared_data: Path) -> Path:
    return shared_data / "trec-dl" / "qrels.dl19-passage.txt"


@pytest.fixture(scope="session")
def dl19_long(shared_data: Path, tmp_path_factory) -> Path:
    """DL19 BM25 top-100 as the rerank job's long-format input, plus two columns a nightly run may carry.

    (query_id, query, doc_id, document, first_stage_rank, first_stage_score, query_type, reranker_score):
    query_type is a segment (every third query "long"); reranker_score stands in for a good reranker:
    2 * label - 3 + N(0, 1) (label 0 when unjudged), a fixed-seed judge that agrees with the qrels.
    """
    pairs, qrels = trec_dl(2019, data_dir=shared_data)
    labels = pairs.join(qrels, keys=["query_id", "doc_id"], join_type="left outer")
    labels = labels.sort_by([("query_id", "ascending"), ("first_stage_rank", "ascending")])
    label = np.nan_to_num(labels["label"].to_numpy(zero_copy_only=False).astype(float))
    rng = np.random.default_rng(0)
    queries = sorted(set(labels["query_id"].to_pylist()))
    kind = {q: "long" if i % 3 == 0 else "short" for i, q in enumerate(queries)}
    table = (
        labels.drop_columns(["label"])
        .append_column("query_type", pa.array([kind[q] for q in labels["query_id"].to_pylist()]))
        .append_column(
            "reranker_score", pa.array(2.0 * label - 3.0 + rng.normal(0.0, 1.0, len(label)))
        )
    )
    path = tmp_path_factory.mktemp("dl19") / "dl19_long.parquet"
    pq.write_table(table, path)
    return path
