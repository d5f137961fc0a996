"""The rerank job end to end on a real local Ray: real DL19 data, both input formats, long documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema as S
from pipeline.core.config import build_config
from pipeline.core.errors import InputError
from pipeline.model import CrossEncoder
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank

from .conftest import read_dir

pytestmark = pytest.mark.slow  # every test runs the job on the session's local Ray (`ray_local`)


def _config(**overrides) -> RerankConfig:
    base = {
        "model": "dummy:tiny",
        "dtype": "float32",
        "progress_interval_s": 1.0,
        "input": {"rows_per_shard": 1000},
        "tokenizer": {"max_length": 512},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[key] = value
    return build_config(RerankConfig, base)


def _check_reconciles(output, input_rows: int) -> dict:
    summary = json.loads((output / "summary.json").read_text())
    assert summary["input_rows"] == input_rows
    assert summary["scored_rows"] + summary["rejected_rows"] == input_rows
    ranked = read_dir(output / "ranked")
    rejected = read_dir(output / "rejected")
    assert (ranked.num_rows if summary["top_k"] is None else summary["scored_rows"]) == summary[
        "scored_rows"
    ]
    assert (0 if rejected is None else rejected.num_rows) == summary["rejected_rows"]
    assert not (output / "_work").exists()
    return summary


def _assert_ranks_agree_with_scores(ranked: pa.Table) -> None:
    rows = sorted(
        ranked.select([S.QUERY_ID, S.DOC_ID, S.SCORE, S.RANK]).to_pylist(),
        key=lambda r: (str(r[S.QUERY_ID]), r[S.RANK]),
    )
    for prev, cur in zip(rows, rows[1:]):
        if prev[S.QUERY_ID] == cur[S.QUERY_ID]:
            assert cur[S.RANK] == prev[S.RANK] + 1
            assert prev[S.SCORE] > cur[S.SCORE] or (
                prev[S.SCORE] == cur[S.SCORE] and str(prev[S.DOC_ID]) < str(cur[S.DOC_ID])
            )
        else:
            assert cur[S.RANK] == 1


@pytest.fixture(scope="module")
def engine():
    return CrossEncoder.from_pretrained("dummy:tiny", dtype="float32")


@pytest.fixture(scope="module")
def dl19_sample(dl19_rows, tmp_path_factory) -> tuple[list[dict], object]:
    """The first 1,500 DL19 pairs (15 whole queries) in the long format, in 300-row row groups: with 300 rows a
    shard, five shards, as many as the whole 4,300 pairs make in 1,000-row shards."""
    rows = dl19_rows[:1500]
    path = tmp_path_factory.mktemp("dl19-sample") / "dl19.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)
    return rows, path


def test_dl19_long_format_every_pair_once_with_engine_scores(
    ray_local, dl19_sample, engine, tmp_path
):
    rows, path = dl19_sample
    output = tmp_path / "out"
    # Two actors in each storage-bound pool and five ranking buckets: parallel readers, writers and rankers
    # must still give each pair exactly once. Tokenizers sized by the job (auto: one for a CPU scorer).
    summary = run_rerank(
        _config(
            io__num_actors=2,
            io__num_cpus=0.1,
            input__rows_per_shard=300,
            output__rows_per_bucket=300,
            tokenizer__num_actors="auto",
        ),
        str(path),
        str(output),
    )
    assert summary["config"]["tokenizer"]["num_actors"] == 1
    # How busy each scorer was: seconds scoring over seconds since it was ready, and the pool's mean.
    busy = [s["busy_fraction"] for s in summary["scorers"]]
    assert (
        busy and all(0 < b <= 1 for b in busy) and all(s["busy_s"] > 0 for s in summary["scorers"])
    )
    assert summary["scorer_busy_fraction"] == round(sum(busy) / len(busy), 3)
    _check_reconciles(output, 1500)
    assert (
        summary["rejected_rows"] == 0 and summary["shards"] == 5 and summary["ranking_buckets"] == 5
    )
    assert summary["random_weights"] is True and summary["attention_backend"] == [
        "sdpa_length_grouped"
    ]
    assert summary["pairs_per_s"] > 0 and summary["tokens_per_s"] > 0
    ranked = read_dir(output / "ranked")
    keys = list(zip(ranked.column(S.QUERY_ID).to_pylist(), ranked.column(S.DOC_ID).to_pylist()))
    assert len(keys) == len(set(keys)) == 1500
    assert set(keys) == {(r["query_id"], r["doc_id"]) for r in rows}
    _assert_ranks_agree_with_scores(ranked)
    # First-stage columns are carried under their own names.
    assert {S.FIRST_STAGE_RANK, S.FIRST_STAGE_SCORE} <= set(ranked.column_names)
    # Scores are the engine's logits, whatever batch each pair landed in.
    expected = engine.compute_score(
        [(r["query"], r["document"]) for r in rows], max_length=512, return_logits=True
    )
    by_key = dict(zip(keys, ranked.column(S.SCORE).to_pylist()))
    got = np.asarray([by_key[(r["query_id"], r["doc_id"])] for r in rows])
    assert np.abs(got - np.asarray(expected)).max() <= 1e-4


def test_grouped_format_needs_no_shuffle_and_scores_the_same(
    ray_local, dl19_rows, engine, tmp_path
):
    by_query: dict = {}
    for r in dl19_rows[:1200]:
        q = by_query.setdefault(
            r["query_id"], {"query_id": r["query_id"], "query": r["query"], "candidates": []}
        )
        q["candidates"].append(
            {"doc_id": r["doc_id"], "document": r["document"], "rank": r["rank"]}
        )
    path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist(list(by_query.values())), path, row_group_size=4)
    output = tmp_path / "out"
    summary = run_rerank(_config(output__top_k=10, input__rows_per_shard=4), str(path), str(output))
    assert summary["input_format"] == "grouped"
    assert summary["ranking_buckets"] == summary["shards"] == 3  # each shard ranks its own queries
    _check_reconciles(output, 1200)
    ranked = read_dir(output / "ranked")
    assert ranked.num_rows == 12 * 10 and max(ranked.column(S.RANK).to_pylist()) == 10
    assert summary["ranked_rows_written"] == 120 and summary["scored_rows"] == 1200
    top = ranked.filter(pa.compute.equal(ranked.column(S.RANK), 1)).to_pylist()[0]
    source = next(
        r for r in dl19_rows if r["query_id"] == top[S.QUERY_ID] and r["doc_id"] == top[S.DOC_ID]
    )
    assert top[S.SCORE] == pytest.approx(
        engine.compute_score(
            (source["query"], source["document"]), max_length=512, return_logits=True
        ),
        abs=1e-4,
    )


def test_windows_mode_scores_the_best_window_like_rerank(ray_local, dl19_rows, engine, tmp_path):
    query = dl19_rows[0]["query"]
    long_doc = " ".join(r["document"] for r in dl19_rows[:40])
    docs = [long_doc, dl19_rows[1]["document"], dl19_rows[2]["document"] * 6]
    table = pa.table(
        {
            "query_id": ["q"] * 3,
            "query": [query] * 3,
            "doc_id": ["long", "short", "mid"],
            "document": docs,
        }
    )
    path = tmp_path / "long.parquet"
    pq.write_table(table, path)
    config = _config(
        tokenizer__long_documents="windows",
        tokenizer__max_length=256,
        tokenizer__max_query_length=64,
    )
    run_rerank(config, str(path), str(tmp_path / "out"))
    ranked = read_dir(tmp_path / "out" / "ranked")
    expected = {
        docs.index(r["document"]): r["relevance_score"]
        for r in engine.rerank(query, docs, max_length=256, max_query_length=64)
    }
    got = dict(zip(ranked.column(S.DOC_ID).to_pylist(), ranked.column(S.SCORE).to_pylist()))
    for i, doc_id in enumerate(["long", "short", "mid"]):
        assert 1 / (1 + math.exp(-got[doc_id])) == pytest.approx(expected[i], abs=1e-5)


def test_bad_input_matrix_every_row_ranked_or_rejected(ray_local, dl19_rows, tmp_path):
    base = dl19_rows[:50]
    rows = [
        dict(query_id=r["query_id"], query=r["query"], doc_id=r["doc_id"], document=r["document"])
        for r in base
    ]
    rows += [
        dict(query_id=1, query=None, doc_id="n1", document="text"),
        dict(query_id=1, query="ok", doc_id="n2", document=None),
        dict(query_id=1, query="", doc_id="n3", document="text"),
        dict(query_id=1, query="ok", doc_id="n4", document=""),
        dict(query_id=None, query="ok", doc_id="n5", document="text"),
        dict(query_id=2, query="grande 5 MB", doc_id="huge", document="palabra " * 700_000),
        dict(
            query_id=3,
            query="Что такое кошка? 猫は何ですか 🐱",
            doc_id="ml",
            document="Кошка — животное. 猫は動物です 🐾",
        ),
        dict(
            query_id=3,
            query="Что такое кошка? 猫は何ですか 🐱",
            doc_id="ml",
            document="a repeated pair",
        ),
    ]
    rows += [
        dict(
            query_id=4,
            query="one query, ten thousand candidates",
            doc_id=f"c{i}",
            document=f"candidate {i}",
        )
        for i in range(10_000)
    ]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("query_id", pa.int64()),
                ("query", pa.string()),
                ("doc_id", pa.string()),
                ("document", pa.string()),
            ]
        ),
    )
    # Mixed id types: a second file with string query ids.
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3000)
    pq.write_table(
        pa.table({"query_id": ["s1"], "query": ["q"], "doc_id": ["x"], "document": ["d"]}),
        tmp_path / "b.parquet",
    )
    output = tmp_path / "out"
    summary = run_rerank(_config(input__rows_per_shard=3000), str(tmp_path), str(output))
    total = len(rows) + 1
    _check_reconciles(output, total)
    assert summary["rejected_by_reason"] == {
        "document is null": 1,
        "duplicate (query_id, doc_id)": 1,
        "empty document": 1,
        "empty query": 1,
        "missing query_id": 1,
        "query is null": 1,
    }
    ranked, rejected = read_dir(output / "ranked"), read_dir(output / "rejected")
    assert ranked.schema.field(S.QUERY_ID).type == pa.string()  # mixed id types -> strings
    assert ranked.filter(pa.compute.equal(ranked.column(S.QUERY_ID), "4")).num_rows == 10_000
    assert "huge" in ranked.column(S.DOC_ID).to_pylist()
    assert set(rejected.column(S.REASON).to_pylist()) == set(summary["rejected_by_reason"])
    # Rejected rows keep their input columns.
    null_doc = rejected.filter(
        pa.compute.equal(rejected.column(S.REASON), "document is null")
    ).to_pylist()[0]
    assert null_doc["doc_id"] == "n2" and null_doc["query"] == "ok"


def test_windows_split_across_blocks_are_all_counted(ray_local, dl19_rows, engine, tmp_path):
    """A row's windows may travel in different blocks; the shard commits only once all are written."""
    import ray

    docs = [" ".join(r["document"] for r in dl19_rows[i : i + 3]) for i in range(0, 24, 3)]
    table = pa.table(
        {
            "query_id": ["q"] * len(docs),
            "query": [dl19_rows[0]["query"]] * len(docs),
            "doc_id": [f"d{i}" for i in range(len(docs))],
            "document": docs,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = 2200  # force Ray to split the tokenizer's output into tiny blocks
    try:
        config = _config(
            tokenizer__long_documents="windows",
            tokenizer__max_length=64,
            tokenizer__max_query_length=16,
            tokenizer__overlap=8,
            scorer__batch_size=2,
        )
        run_rerank(config, str(tmp_path / "in.parquet"), str(tmp_path / "out"))
    finally:
        ctx.target_max_block_size = saved
    ranked = read_dir(tmp_path / "out" / "ranked")
    got = dict(zip(ranked.column(S.DOC_ID).to_pylist(), ranked.column(S.SCORE).to_pylist()))
    expected = engine.rerank(
        dl19_rows[0]["query"], docs, max_length=64, max_query_length=16, overlap=8
    )
    for r in expected:
        assert 1 / (1 + math.exp(-got[f"d{r['index']}"])) == pytest.approx(
            r["relevance_score"], abs=1e-5
        )


def test_grouped_query_repeated_across_rows_is_ranked_once(ray_local, tmp_path):
    rows = [
        {
            "query_id": "q",
            "query": "cats",
            "candidates": [
                {"doc_id": "d1", "document": "a cat"},
                {"doc_id": "d2", "document": "a dog"},
            ],
        },
        {
            "query_id": "q",
            "query": "cats",
            "candidates": [
                {"doc_id": "d1", "document": "a cat"},
                {"doc_id": "d3", "document": "a cow"},
            ],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet", row_group_size=1)
    summary = run_rerank(
        _config(input__rows_per_shard=1), str(tmp_path / "g.parquet"), str(tmp_path / "out")
    )
    ranked = read_dir(tmp_path / "out" / "ranked")
    assert sorted(ranked.column(S.RANK).to_pylist()) == [1, 2, 3]
    assert summary["rejected_by_reason"] == {"duplicate (query_id, doc_id)": 1}
    _check_reconciles(tmp_path / "out", 4)


def test_empty_row_groups_and_files_are_skipped(ray_local, dl19_rows, tmp_path):
    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("query", pa.string()),
            ("doc_id", pa.string()),
            ("document", pa.string()),
        ]
    )
    pq.write_table(schema.empty_table(), tmp_path / "a_empty.parquet")
    rows = [
        {k: str(r[k]) for k in ("query_id", "query", "doc_id", "document")} for r in dl19_rows[:30]
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "b.parquet")
    summary = run_rerank(_config(), str(tmp_path), str(tmp_path / "out"))
    assert summary["scored_rows"] == 30 and summary["shards"] == 1
    _check_reconciles(tmp_path / "out", 30)


def test_finished_output_with_other_settings_is_refused(ray_local, dl19_rows, tmp_path):
    from pipeline.core.errors import InputError, OutputError

    rows = [
        {k: str(r[k]) for k in ("query_id", "query", "doc_id", "document")} for r in dl19_rows[:20]
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    first = run_rerank(_config(), str(tmp_path / "in.parquet"), str(tmp_path / "out"))
    again = run_rerank(
        _config(scorer__batch_size=7), str(tmp_path / "in.parquet"), str(tmp_path / "out")
    )
    assert again == first  # same result settings: nothing to do
    with pytest.raises(OutputError, match="other settings"):
        run_rerank(_config(output__top_k=3), str(tmp_path / "in.parquet"), str(tmp_path / "out"))
    with pytest.raises(InputError, match="no GPU"):
        run_rerank(
            _config(scorer__device="cuda"), str(tmp_path / "in.parquet"), str(tmp_path / "out2")
        )
    assert not (tmp_path / "out2" / "ranked").exists()


def test_actor_pools_larger_than_the_machine_are_refused_before_work(
    ray_local, dl19_long, tmp_path
):
    # 4 tokenizers x 0.5 CPU + the scorer's 1 + 0.5 of I/O on a 2-CPU Ray: the fixed pools would wait forever.
    with pytest.raises(InputError, match=r"asks for 3.5 CPUs .* tokenizer.num_actors"):
        run_rerank(_config(tokenizer__num_actors=4), str(dl19_long), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "ranked").exists()
