"""Edge cases of the selection: all positives, no candidates, too few survivors, ties, and bad input."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.hard_negatives.config import SelectionConfig
from pipeline.hard_negatives.select import CANONICAL_SCHEMA, DROP_REASON, KEEP, select_negatives
from pipeline.hard_negatives.stats import compute_stats


def candidates(rows: list[tuple[str, str, float, int | None]], **extra) -> pa.Table:
    """(query_id, doc_id, score, label) rows; documents are distinct texts, ranks follow row order per query."""
    ranks, seen = [], {}
    for q, *_ in rows:
        seen[q] = seen.get(q, 0) + 1
        ranks.append(seen[q])
    columns = {
        schema.QUERY_ID: pa.array([r[0] for r in rows], pa.string()),
        schema.DOC_ID: pa.array([r[1] for r in rows], pa.string()),
        schema.DOCUMENT: pa.array([f"passage {r[0]} {r[1]}" for r in rows], pa.string()),
        schema.SCORE: pa.array([r[2] for r in rows], pa.float32()),
        schema.LABEL: pa.array([r[3] for r in rows], pa.int32()),
        schema.FIRST_STAGE_RANK: pa.array(ranks, pa.int32()),
    }
    columns.update(extra)
    return pa.table(columns)


def reasons(canonical: pa.Table) -> dict[str, str | None]:
    return dict(zip(canonical[schema.DOC_ID].to_pylist(), canonical[DROP_REASON].to_pylist()))


def test_a_query_whose_candidates_are_all_positives_gets_no_negatives():
    table = candidates(
        [("q", "a", 3.0, 1), ("q", "b", 2.0, 1), ("r", "x", 1.0, 1), ("r", "y", 0.0, None)]
    )
    canonical = select_negatives(table, SelectionConfig())
    assert reasons(canonical) == {"a": "positive", "b": "positive", "x": "positive", "y": None}
    stats = compute_stats(canonical, SelectionConfig())
    assert stats["queries"]["without_negatives"] == 1 and stats["queries"]["short"] == 2
    assert stats["negatives_per_query"] == {"0": 1, "1": 1}


def test_no_candidates():
    empty = candidates([])
    canonical = select_negatives(empty, SelectionConfig())
    assert canonical.num_rows == 0 and canonical.schema == CANONICAL_SCHEMA
    stats = compute_stats(canonical, SelectionConfig())
    assert (
        stats["rows"] == 0
        and stats["queries"]["in"] == 0
        and stats["scores"]["kept_negatives"] == {"count": 0}
    )
    # A judged query with no candidate row cannot appear in the table: the stats say so instead.
    table = candidates([("q", "a", 1.0, None), ("q", "b", 0.0, None)]).drop_columns([schema.LABEL])
    qrels = pa.table(
        {schema.QUERY_ID: ["q", "lonely"], schema.DOC_ID: ["a", "z"], schema.LABEL: [1, 1]}
    )
    stats = compute_stats(
        select_negatives(table, SelectionConfig(), qrels), SelectionConfig(), qrels
    )
    assert stats["qrels"] == {"queries_without_candidates": 1, "positives_not_in_candidates": 0}


def test_fewer_survivors_than_wanted_are_reported_never_padded():
    rows = [("q", "p", 10.0, 1)] + [("q", f"n{i}", 10.0 - i, None) for i in range(1, 6)]
    # 0.3 relative margin: survivors need score <= 7, i.e. n3, n4, n5 -> 3 of the 10 wanted.
    canonical = select_negatives(
        candidates(rows), SelectionConfig(num_negatives=10, relative_margin=0.3)
    )
    assert reasons(canonical) == {
        "p": "positive",
        "n1": "margin",
        "n2": "margin",
        "n3": None,
        "n4": None,
        "n5": None,
    }
    stats = compute_stats(canonical, SelectionConfig(num_negatives=10, relative_margin=0.3))
    assert stats["queries"]["short"] == 1 and stats["negatives_per_query"] == {"3": 1}
    assert stats["queries"]["with_full_quota"] == 0 and stats["kept_negatives"] == 3


def test_ties_in_score_are_broken_by_doc_id_whatever_the_input_order():
    rows = [
        ("q", "p", 5.0, 1),
        ("q", "c", 1.0, None),
        ("q", "a", 1.0, None),
        ("q", "b", 1.0, None),
        ("q", "d", 0.5, None),
    ]
    config = SelectionConfig(num_negatives=2)
    forward = select_negatives(candidates(rows), config)
    backward = select_negatives(candidates(rows[::-1]), config)
    assert reasons(forward) == {
        "p": "positive",
        "a": None,
        "b": None,
        "c": "not_sampled",
        "d": "not_sampled",
    }
    assert forward.drop_columns([schema.FIRST_STAGE_RANK]).equals(
        backward.drop_columns([schema.FIRST_STAGE_RANK])
    )
    assert forward[schema.DOC_ID].to_pylist() == [
        "p",
        "a",
        "b",
        "c",
        "d",
    ]  # rank order: score, then doc_id


def test_a_pseudo_positive_needs_the_threshold():
    table = candidates(
        [("q", "a", 3.0, None), ("q", "b", 1.0, None), ("r", "x", 1.0, None), ("r", "y", 0.5, None)]
    )
    canonical = select_negatives(table, SelectionConfig(pseudo_positive_min_score=2.0))
    assert reasons(canonical) == {
        "a": "positive",
        "b": None,
        "x": "no_positive",
        "y": "no_positive",
    }


def test_integer_ids_are_read_as_strings():
    table = candidates([("1", "10", 2.0, 1), ("1", "11", 1.0, None)])
    table = table.set_column(0, schema.QUERY_ID, pa.array([1, 1])).set_column(
        1, schema.DOC_ID, pa.array([10, 11])
    )
    qrels = pa.table({schema.QUERY_ID: [1], schema.DOC_ID: [10], schema.LABEL: [1]})
    canonical = select_negatives(table.drop_columns([schema.LABEL]), SelectionConfig(), qrels)
    assert canonical[schema.QUERY_ID].type == pa.string()
    assert reasons(canonical) == {"10": "positive", "11": None}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.drop_columns([schema.SCORE]), "lacks column(s) ['score']"),
        (lambda t: pa.concat_tables([t, t.slice(0, 1)]), "pairs repeat"),
        (
            lambda t: t.set_column(3, schema.SCORE, pa.array([float("nan"), 1.0], pa.float32())),
            "NaN",
        ),
        (lambda t: t.drop_columns([schema.LABEL]), "pass a qrels table"),
        (lambda t: t.set_column(0, schema.QUERY_ID, pa.array([None, "q"], pa.string())), "null"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    table = candidates([("q", "a", 2.0, 1), ("q", "b", 1.0, None)])
    with pytest.raises(
        InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        select_negatives(change(table), SelectionConfig())


def test_a_rank_window_needs_first_stage_ranks():
    table = candidates([("q", "a", 2.0, 1), ("q", "b", 1.0, None)]).drop_columns(
        [schema.FIRST_STAGE_RANK]
    )
    assert select_negatives(table, SelectionConfig())[KEEP].to_pylist() == [False, True]
    with pytest.raises(InputError, match="first_stage_rank"):
        select_negatives(table, SelectionConfig(range_min=1))
