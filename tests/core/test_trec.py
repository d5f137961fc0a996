"""TREC qrels / run files <-> Arrow tables: real files, round trips, and errors that name file and line."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels, read_run, write_qrels, write_run


def test_reads_trec_eval_test_files(shared_data):
    qrels = read_qrels(str(shared_data / "trec-eval" / "qrels.test"))
    run = read_run(str(shared_data / "trec-eval" / "results.test"))
    assert qrels.schema.names == ["query_id", "doc_id", "label"] and qrels.num_rows == 3681
    assert (
        run.schema.names == ["query_id", "doc_id", "rank", "score", "tag"] and run.num_rows == 1500
    )
    assert set(run["query_id"].to_pylist()) == {"301", "302", "303"}
    assert run["tag"][0].as_py() == "STANDARD" and run["score"].type == pa.float64()


def test_trailing_fields_after_the_tag_are_ignored_as_in_trec_eval(shared_data):
    # results.trunc has "STANDARD more junk at" lines; trec_eval reads them, so must we.
    run = read_run(str(shared_data / "trec-eval" / "results.trunc"))
    assert run.num_rows == 584 and set(run["tag"].to_pylist()) == {"STANDARD"}


def test_ids_stay_strings_comments_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("# a comment\n\n0012 Q0 007 1 2.5 t\n12 Q0 7 1 1.5 t\n")
    run = read_run(str(path))
    assert run["query_id"].to_pylist() == ["0012", "12"] and run["doc_id"].to_pylist() == [
        "007",
        "7",
    ]


@pytest.mark.parametrize(
    "read, text, message",
    [
        (read_run, "1 Q0 d1 1 0.5 tag\n1 Q0 d2 1\n", "line 2: expected 6 fields"),
        (read_run, "1 Q0 d1 x 0.5 tag\n", "line 1: rank 'x' is not an integer"),
        (read_run, "1 Q0 d1 1 high tag\n", "line 1: score 'high' is not a number"),
        (
            read_run,
            "1 Q0 d1 1 0.5 t\n1 Q0 d1 2 0.4 t\n",
            "lists document 'd1' for query '1' more than once",
        ),
        (read_qrels, "1 0 d1 1\n1 0 d2\n", "line 2: expected 4 fields"),
        (read_qrels, "1 0 d1 yes\n", "line 1: label 'yes' is not an integer"),
        (read_qrels, "1 0 d1 1\n1 0 d1 0\n", "lists document 'd1' for query '1' more than once"),
        (read_qrels, "# only a comment\n", "holds no judgements"),
    ],
)
def test_malformed_files_are_errors_naming_file_and_line(tmp_path, read, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["nope.txt", "nope.parquet"])
def test_missing_file_says_so(tmp_path, name):
    with pytest.raises(InputError, match="not found"):
        read_run(str(tmp_path / name))


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "run.bin"
    path.write_bytes(b"1 Q0 d 1 0.5 t\n\xff\xfe\x00garbage\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_run(str(path))


@pytest.mark.parametrize("suffix", ["txt", "parquet"])
def test_qrels_round_trip(shared_data, tmp_path, suffix):
    qrels = read_qrels(str(shared_data / "trec-dl" / "qrels.dl19-passage.txt"))
    write_qrels(qrels, str(tmp_path / f"q.{suffix}"))
    again = read_qrels(str(tmp_path / f"q.{suffix}"))
    assert again.equals(qrels)


@pytest.mark.parametrize("suffix", ["txt", "parquet"])
def test_run_round_trip_keeps_scores_exactly_and_writes_trec_eval_order(tmp_path, suffix):
    # Ties on purpose: trec_eval orders them by doc_id descending, so "b" outranks "a".
    run = pa.table(
        {
            "query_id": ["q1", "q1", "q1", "q1", "q2"],
            "doc_id": ["a", "b", "c", "d", "z"],
            "score": [0.5, 0.5, 0.1 + 0.2, 1e-17, -2.0],
        }
    )
    write_run(run, str(tmp_path / f"r.{suffix}"), tag="mine")
    again = read_run(str(tmp_path / f"r.{suffix}"))
    assert again["doc_id"].to_pylist() == ["b", "a", "c", "d", "z"]
    assert again["rank"].to_pylist() == [1, 2, 3, 4, 1]
    assert again["score"].to_pylist() == [
        0.5,
        0.5,
        0.1 + 0.2,
        1e-17,
        -2.0,
    ]  # repr() round-trips floats exactly
    assert set(again["tag"].to_pylist()) == {"mine"}
