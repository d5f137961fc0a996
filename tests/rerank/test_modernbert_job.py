"""The rerank job with a ModernBERT cross-encoder on the session's local Ray: every pair ranked once, scored as
the engine scores it alone."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema as S
from pipeline.core.config import build_config
from pipeline.model import CrossEncoder
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank

from .conftest import read_dir

pytestmark = pytest.mark.slow  # runs the job on the session's local Ray (`ray_local`)


def test_job_ranks_every_pair_with_the_engines_scores(ray_local, dl19_rows, tmp_path):
    model = "dummy:tiny-modernbert"
    # Two queries; passages longer than ModernBERT's 128-token window among them.
    rows = dl19_rows[:150]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    config = build_config(
        RerankConfig, {"model": model, "dtype": "float32", "tokenizer": {"max_length": 256}}
    )
    summary = run_rerank(config, str(path), str(tmp_path / "out"))
    assert summary["layout"] == "modernbert" and summary["random_weights"] is True
    assert summary["prompt"] is None  # a cross-encoder reads the pair without a prompt template
    assert summary["scored_rows"] == len(rows) and summary["rejected_rows"] == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scored_rows"] == len(rows)
    ranked = read_dir(tmp_path / "out" / "ranked").to_pylist()
    keys = [(r[S.QUERY_ID], r[S.DOC_ID]) for r in ranked]
    assert sorted(keys) == sorted((r["query_id"], r["doc_id"]) for r in rows)
    for query in {r[S.QUERY_ID] for r in ranked}:
        mine = sorted((r for r in ranked if r[S.QUERY_ID] == query), key=lambda r: r[S.RANK])
        assert [r[S.RANK] for r in mine] == list(range(1, len(mine) + 1))
        assert all(a[S.SCORE] >= b[S.SCORE] for a, b in zip(mine, mine[1:]))
    engine = CrossEncoder.from_pretrained(model, dtype="float32")
    expected = engine.compute_score(
        [(r["query"], r["document"]) for r in rows], max_length=256, return_logits=True
    )
    by_key = {(r[S.QUERY_ID], r[S.DOC_ID]): r[S.SCORE] for r in ranked}
    got = np.asarray([by_key[(r["query_id"], r["doc_id"])] for r in rows])
    assert np.abs(got - np.asarray(expected)).max() <= 1e-4
