"""Fixtures of the index-quality tests: the real TREC DL 2019 candidates as the rerank job's Parquet input,
and a real S3 server (moto in server mode on loopback) for object-storage outputs and history."""

from __future__ import annotations

import re
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
    table = labels.drop_columns(["label"]).append_column(
        "query_type", pa.array([kind[q] for q in labels["query_id"].to_pylist()])
    ).append_column("reranker_score", pa.array(2.0 * label - 3.0 + rng.normal(0.0, 1.0, len(label))))
    path = tmp_path_factory.mktemp("dl19") / "dl19_long.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (a random free port) for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> tuple[str, dict]:
    """A fresh bucket: ("s3://<bucket>", storage_options for s3fs)."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = ("quality-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}", options
