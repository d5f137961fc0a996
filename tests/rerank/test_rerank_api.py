"""The rerank API every consumer uses: texts and input columns carried to ranked/, read back part by part."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.config import load_config
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.quality.config import IndexQualityConfig
from pipeline.rerank.api import read_part, rerank
from pipeline.rerank.config import RerankConfig

FAST = ["tokenizer.max_length=96", "output.rows_per_bucket=120"]


@pytest.fixture(scope="module")
def three_queries(dl19_rows, tmp_path_factory):
    """300 DL19 pairs (3 queries) with a label column and the first stage's rank/score."""
    queries = sorted({r["query_id"] for r in dl19_rows})[:3]
    rows = [
        dict(r, label=i % 3) for i, r in enumerate(r for r in dl19_rows if r["query_id"] in queries)
    ]
    path = tmp_path_factory.mktemp("api") / "input.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    return path, rows


@pytest.mark.slow  # the rerank job on a local Ray
def test_rerank_carries_texts_and_columns_and_reads_back_by_part(
    ray_local, three_queries, tmp_path
):
    path, rows = three_queries
    config = load_config(
        RerankConfig, None, [*FAST, "output.carry_texts=true"], model="dummy:tiny", dtype="float32"
    )
    result = rerank(config, str(path), str(tmp_path / "out"))
    assert result.summary["scored_rows"] == len(rows) and result.summary["ranking_buckets"] == 3

    parts = result.parts()
    assert len(parts) == 3
    seen: set[str] = set()
    for uri in parts:  # a query's rows never span two parts: a part is a unit of per-query work
        ids = set(read_part(uri, columns=[schema.QUERY_ID])[schema.QUERY_ID].to_pylist())
        assert not ids & seen
        seen |= ids

    batches = list(result.iter_batches())
    ranked = pa.Table.from_batches(batches)
    assert ranked.num_rows == len(rows)
    given = {(r["query_id"], r["doc_id"]): r for r in rows}
    for r in ranked.to_pylist():
        source = given[(r[schema.QUERY_ID], r[schema.DOC_ID])]
        assert (r[schema.QUERY], r[schema.DOCUMENT], r[schema.LABEL]) == (
            source["query"],
            source["document"],
            source["label"],
        )
        assert r[schema.FIRST_STAGE_RANK] == source["rank"]

    only = pa.Table.from_batches(list(result.iter_batches([schema.DOC_ID, schema.SCORE])))
    assert only.column_names == [schema.DOC_ID, schema.SCORE] and only.num_rows == len(rows)
    assert result.dataset([schema.SCORE]).count() == len(rows)


@pytest.mark.slow  # the rerank job on a local Ray
def test_texts_are_dropped_unless_asked(ray_local, three_queries, tmp_path):
    path, rows = three_queries
    config = load_config(RerankConfig, None, FAST, model="dummy:tiny", dtype="float32")
    result = rerank(config, str(path), str(tmp_path / "out"))
    names = pq.read_schema(result.parts()[0]).names
    assert schema.DOCUMENT not in names and schema.QUERY not in names and schema.LABEL in names
    assert pc.sum(
        pa.array([b.num_rows for b in result.iter_batches([schema.SCORE])])
    ).as_py() == len(rows)


@pytest.mark.parametrize("cls", [HardNegativesConfig, IndexQualityConfig])
def test_both_jobs_embed_the_whole_rerank_section(cls):
    config = load_config(
        cls,
        None,
        ["rerank.scorer.num_actors=8", "rerank.io.rows_per_write=500"],
        rerank__model="dummy:tiny",
    )
    rerank_config = config.rerank_config()
    assert (rerank_config.scorer.num_actors, rerank_config.io.rows_per_write) == (8, 500)
    assert rerank_config.model == "dummy:tiny"
    assert (
        rerank_config.tokenizer.max_length == RerankConfig().tokenizer.max_length
    )  # the rerank job's defaults
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="rerank.scorer.num_actors"):
        load_config(cls, None, ["rerank.scorer.num_actors=0"])
    with pytest.raises(ConfigError, match="rerank.scorer.nm_actors"):
        load_config(cls, None, ["rerank.scorer.nm_actors=2"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config(cls, None, ["rerank.output.top_k=10"])
