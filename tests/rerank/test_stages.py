"""The stages as plain classes, without Ray: validate, tokenize, score, rank."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema as S
from pipeline.core.errors import InputError
from pipeline.core.storage import url_to_fs
from pipeline.model import CrossEncoder
from pipeline.rerank.config import InputConfig, ScorerConfig, TokenizerConfig
from pipeline.rerank.stages.rank import rank_rows
from pipeline.rerank.stages.read import ReadShard, plan_shards
from pipeline.rerank.stages.score import ScoreStage
from pipeline.rerank.stages.tokenize import TokenizeStage
from pipeline.rerank.stages.validate import InputLayout


def _read_all(path, **config) -> tuple[InputLayout, pa.Table]:
    layout = InputLayout.from_schemas([pq.read_schema(path)], InputConfig(**config))
    fs, p = url_to_fs(str(path))
    shards = plan_shards(fs, [p], layout, rows_per_shard=10**9)
    reader = ReadShard(layout, {}, str(path))
    return layout, pa.concat_tables([reader.read(s) for s in shards])


def test_long_input_validation_reasons(tmp_path):
    rows = [
        dict(
            query_id="q1", query="what is a cat", doc_id="d1", document="a cat is an animal", rank=1
        ),
        dict(query_id="q1", query="what is a cat", doc_id="d2", document=None, rank=2),
        dict(query_id="q1", query="what is a cat", doc_id="d3", document="   ", rank=3),
        dict(query_id=None, query="x", doc_id="d4", document="y", rank=4),
        dict(query_id="q2", query="", doc_id="d5", document="y", rank=1),
        dict(query_id="q2", query="emoji 🙂 ok", doc_id=None, document="y", rank=2),
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    layout, table = _read_all(path)
    assert table.column(S.REASON).to_pylist() == [
        None,
        "document is null",
        "empty document",
        "missing query_id",
        "empty query",
        "missing doc_id",
    ]
    # The input's own `rank` is carried as first_stage_rank, so the reranker's rank cannot overwrite it.
    assert table.column(S.FIRST_STAGE_RANK).to_pylist() == [1, 2, 3, 4, 1, 2]
    assert len(set(table.column("_row").to_pylist())) == 6


def test_grouped_input_explodes_and_rejects_empty_queries(tmp_path):
    cand = pa.list_(
        pa.struct([("doc_id", pa.int64()), ("document", pa.string()), ("rank", pa.int32())])
    )
    table = pa.table(
        {
            "query_id": [7, 8, 9],
            "query": ["a", "b", "c"],
            "lang": ["en", "de", "fr"],
            "candidates": pa.array(
                [
                    [
                        {"doc_id": 1, "document": "x", "rank": 1},
                        {"doc_id": 2, "document": "y", "rank": 2},
                    ],
                    [],
                    None,
                ],
                type=cand,
            ),
        }
    )
    path = tmp_path / "grouped.parquet"
    pq.write_table(table, path)
    layout, rows = _read_all(path)
    assert layout.grouped
    assert rows.num_rows == 4
    assert rows.column(S.QUERY_ID).to_pylist() == [7, 7, 8, 9]
    assert rows.column("lang").to_pylist() == ["en", "en", "de", "fr"]
    assert rows.column(S.FIRST_STAGE_RANK).to_pylist() == [1, 2, None, None]
    assert rows.column(S.REASON).to_pylist() == [
        None,
        None,
        "query has no candidates",
        "query has no candidates",
    ]


def test_table_level_errors_name_the_column(tmp_path):
    with pytest.raises(InputError, match="column `document` not found.*input.document_column"):
        InputLayout.from_schemas(
            [
                pa.schema(
                    [
                        ("query_id", pa.string()),
                        ("query", pa.string()),
                        ("doc_id", pa.string()),
                        ("doc", pa.string()),
                    ]
                )
            ],
            InputConfig(),
        )
    # Every missing column in the one line, not one per run.
    with pytest.raises(
        InputError,
        match="columns `query`, `document` not found.*`input.query_column`, "
        "`input.document_column` to the right names",
    ):
        InputLayout.from_schemas(
            [pa.schema([("query_id", pa.string()), ("doc_id", pa.string())])], InputConfig()
        )
    with pytest.raises(InputError, match="text column `document` has type int64"):
        InputLayout.from_schemas(
            [
                pa.schema(
                    [
                        ("query_id", pa.string()),
                        ("query", pa.string()),
                        ("doc_id", pa.string()),
                        ("document", pa.int64()),
                    ]
                )
            ],
            InputConfig(),
        )
    with pytest.raises(InputError, match="ids must be integers or strings"):
        InputLayout.from_schemas(
            [
                pa.schema(
                    [
                        ("query_id", pa.float64()),
                        ("query", pa.string()),
                        ("doc_id", pa.string()),
                        ("document", pa.string()),
                    ]
                )
            ],
            InputConfig(),
        )
    # Mixed id types across files: read as strings, so one query cannot split in two.
    a = pa.schema(
        [
            ("query_id", pa.int64()),
            ("query", pa.string()),
            ("doc_id", pa.int32()),
            ("document", pa.string()),
        ]
    )
    b = pa.schema(
        [
            ("query_id", pa.string()),
            ("query", pa.string()),
            ("doc_id", pa.int64()),
            ("document", pa.string()),
        ]
    )
    layout = InputLayout.from_schemas([a, b], InputConfig())
    assert layout.query_id_type == pa.string() and layout.doc_id_type == pa.int64()


def test_tokenize_then_score_match_the_engine(dl19_long):
    layout, table = _read_all(dl19_long)
    batch = table.slice(0, 300)
    tokenized = TokenizeStage("dummy:tiny", None, TokenizerConfig(max_length=256))(batch)
    lengths = tokenized.column(S.NUM_TOKENS).to_numpy()
    assert (np.diff(lengths) <= 0).all()  # longest first
    assert tokenized.column(S.QUERY).null_count == 300  # texts dropped once tokenized
    scored = ScoreStage(
        "dummy:tiny",
        None,
        "float32",
        ScorerConfig(max_tokens_per_batch=2048),
        str(dl19_long.parent / "scorers"),
        {},
    )(tokenized)
    assert S.INPUT_IDS not in scored.column_names
    engine = CrossEncoder.from_pretrained("dummy:tiny", dtype="float32")
    by_row = dict(zip(scored.column("_row").to_pylist(), scored.column(S.SCORE).to_pylist()))
    expected = engine.compute_score(
        list(zip(batch.column(S.QUERY).to_pylist(), batch.column(S.DOCUMENT).to_pylist())),
        max_length=256,
        return_logits=True,
    )
    got = [by_row[r] for r in batch.column("_row").to_pylist()]
    assert np.abs(np.asarray(got) - np.asarray(expected)).max() <= 1e-4


def test_rank_rows_ties_duplicates_windows_and_top_k():
    table = pa.table(
        {
            S.QUERY_ID: ["q", "q", "q", "q", "q", "r"],
            S.DOC_ID: ["b", "a", "c", "a", "c", "z"],
            S.SCORE: pa.array([1.0, 1.0, 0.5, 3.0, 2.0, 0.1], pa.float32()),
            "_row": pa.array([1, 2, 3, 4, 3, 5], pa.int64()),
            S.WINDOW: pa.array([0, 0, 0, 0, 1, 0], pa.int32()),
            "_shard": pa.array([0] * 6, pa.int32()),
        }
    )
    ranked, duplicates, scored = rank_rows(table, top_k=None)
    # row 4 repeats (q, a) after row 2: rejected; row 3's best window scores 2.0; the 1.0 tie goes to "a".
    assert duplicates.column("_row").to_pylist() == [4]
    assert scored == 4
    assert list(zip(ranked.column(S.DOC_ID).to_pylist(), ranked.column(S.RANK).to_pylist())) == [
        ("c", 1),
        ("a", 2),
        ("b", 3),
        ("z", 1),
    ]
    assert ranked.column_names[:4] == [S.QUERY_ID, S.DOC_ID, S.SCORE, S.RANK]
    top1, _, scored_top = rank_rows(table, top_k=1)
    assert top1.column(S.DOC_ID).to_pylist() == ["c", "z"] and scored_top == 4
    # A retried write (same row and window twice) counts once.
    again, _, _ = rank_rows(pa.concat_tables([table, table.slice(0, 2)]), top_k=None)
    assert again.num_rows == 4
    assert pc.all(pc.is_valid(again.column(S.SCORE))).as_py()


def test_a_long_scorer_call_sends_heartbeats_the_watchdog_counts(dl19_long, monkeypatch):
    """One call of many micro-batches reports (0, 0) between them, so a slow device is not taken for a stall;
    the progress counter counts those empty reports as beats."""
    from pipeline.rerank.progress import ScoreCounter
    from pipeline.rerank.stages import score

    layout, table = _read_all(dl19_long)
    tokenized = TokenizeStage("dummy:tiny", None, TokenizerConfig(max_length=256))(
        table.slice(0, 200)
    )
    monkeypatch.setattr(score, "HEARTBEAT_S", 0.0)
    counter = ScoreCounter()
    stage = ScoreStage(
        "dummy:tiny",
        None,
        "float32",
        ScorerConfig(max_tokens_per_batch=512),
        str(dl19_long.parent / "scorers-beats"),
        {},
        on_scored=functools.partial(counter.add, "run"),
    )
    stage(tokenized)
    pairs, rejected, beats = counter.get_with_beats("run")
    assert pairs + rejected == 200 and counter.get("run") == (pairs, rejected)
    # 200 pairs of up to 256 tokens under a 512-token budget: dozens of micro-batches, a beat after each
    assert beats > 20, beats


def test_a_scorer_idle_after_its_last_call_counts_as_idle():
    """A scorer's record is written inside its calls only; the summary counts a scorer of this run up to the
    end of the scoring phase, so one that waited for tokens after its last call does not look busy."""
    from pipeline.rerank.summary import busy

    record = {"busy_s": 10.0, "wall_s": 10.0, "ready_unix": 1000.0}
    assert busy(record)["busy_fraction"] == 1.0  # what the record alone says
    assert busy(record, (990.0, 1040.0)) == {"busy_s": 10.0, "wall_s": 40.0, "busy_fraction": 0.25}
    # a record of an earlier run of the same output (ready before this run's scoring) keeps its own figures
    assert busy(record, (2000.0, 2100.0))["busy_fraction"] == 1.0
