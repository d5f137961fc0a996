"""The positives' query ids are checked against the input's before any scoring: none in common is one `error:`
line with examples of both id sets (exit 2, nothing written); some in common is a warning with the count."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.hard_negatives import main
from pipeline.core import schema
from pipeline.core.config import load_config
from pipeline.core.trec import read_qrels
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.job import check_positives_meet_input


@pytest.fixture(scope="module")
def three_queries(shared_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(input Parquet: 3 DL19 queries with positives, 5 candidates each; the NIST qrels file; their query ids)."""
    from pipeline.datasets import trec_dl

    pairs, qrels = trec_dl(2019, shared_data)
    positive = pc.unique(qrels.filter(pc.greater_equal(qrels[schema.LABEL], 2))[schema.QUERY_ID])
    chosen = sorted(
        pc.unique(
            pairs.filter(pc.is_in(pairs[schema.QUERY_ID], positive))[schema.QUERY_ID]
        ).to_pylist()
    )[:3]
    rows = [
        r
        for r in pairs.filter(pc.is_in(pairs[schema.QUERY_ID], pa.array(chosen))).to_pylist()
        if r[schema.FIRST_STAGE_RANK] <= 5
    ]
    path = tmp_path_factory.mktemp("positives_check") / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, shared_data / "trec-dl" / "qrels.dl19-passage.txt", chosen


def test_positives_of_other_queries_are_refused_before_any_work(
    three_queries, tmp_path, run_entry_point
):
    source, qrels, chosen = three_queries
    other = tmp_path / "other-qrels.txt"
    other.write_text("q-a 0 d1 1\nq-b 0 d2 2\n")
    result = run_entry_point(
        main,
        "--input",
        source,
        "--positives",
        other,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    # Both id sets shown, so the user sees at a glance how they differ.
    assert "other-qrels.txt" in errors[0] and chosen[0] in errors[0] and "'q-a'" in errors[0]
    assert not (tmp_path / "out").exists()  # refused before the rerank


def test_positives_of_some_queries_are_a_warning_with_the_count(three_queries, tmp_path, caplog):
    source, qrels_path, chosen = three_queries
    qrels = read_qrels(str(qrels_path))
    # The first query's positives left out: it is still judged (its label-0 rows), but has no positive.
    drop = pc.and_(
        pc.equal(qrels[schema.QUERY_ID], chosen[0]), pc.greater_equal(qrels[schema.LABEL], 2)
    )
    partial = qrels.filter(pc.invert(drop))
    config = load_config(HardNegativesConfig, overrides=["selection.min_positive_label=2"])
    with caplog.at_level(logging.WARNING, logger="hard_negatives"):
        counts = check_positives_meet_input(config, str(source), "partial-qrels", partial)
    assert counts == {"input_queries": 3, "input_queries_without_positives": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "1 of 3 input queries have no positive in partial-qrels"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hard_negatives"):
        assert (
            check_positives_meet_input(config, str(source), "all", qrels)[
                "input_queries_without_positives"
            ]
            == 0
        )
    assert not caplog.records


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not JSON"),
        ('["a list"]', "is not a rerank summary (no `config_hash`)"),
        ('{"config_hash": 7}', "is not a rerank summary"),
    ],
)
def test_a_damaged_rerank_summary_is_one_line_naming_it(
    three_queries, tmp_path, run_entry_point, content, message
):
    source, qrels, _ = three_queries
    output = tmp_path / "out"
    (output / "rerank").mkdir(parents=True)
    (output / "rerank" / "summary.json").write_text(content)
    result = run_entry_point(
        main,
        "--input",
        source,
        "--positives",
        qrels,
        "--output",
        output,
        "--model",
        "dummy:tiny",
        "--set",
        "selection.min_positive_label=2",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert (
        f"{output / 'rerank' / 'summary.json'} {message}" in errors[0]
        and "to score again" in errors[0]
    )
