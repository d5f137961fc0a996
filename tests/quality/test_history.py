"""The nightly history on a local folder and on a real S3 server: one row per night, reruns replace it."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import InputError
from pipeline.quality.history import History


def _night(night: str, ndcg: float, **more) -> tuple[dict, pa.Table]:
    row = {
        "night": night,
        "written_at": dt.datetime.now(dt.timezone.utc),
        "run": "r",
        "num_queries": 2,
        "config_hash": "h",
        "nDCG@10": ndcg,
        **more,
    }
    per_query = pa.table({"query_id": ["q1", "q2"], "nDCG@10": [ndcg, ndcg]})
    return row, per_query


@pytest.fixture(params=["local", "s3"])
def history(request, tmp_path) -> History:
    if request.param == "local":
        return History(str(tmp_path / "history"))
    uri, options = request.getfixturevalue("s3_bucket")
    return History(f"{uri}/quality/my-index", options)


def test_rerun_of_a_night_replaces_its_row(history):
    assert history.read() is None and history.previous_night("2024-05-02") is None
    history.append(*_night("2024-05-01", 0.50))
    history.append(*_night("2024-05-02", 0.40))
    history.append(*_night("2024-05-02", 0.45))  # rerun of the same night
    table = History(history.uri, history.storage_options).read()  # a fresh reader sees the same
    assert table["night"].to_pylist() == ["2024-05-01", "2024-05-02"]
    assert table["nDCG@10"].to_pylist() == [0.50, 0.45]
    assert history.read_per_query("2024-05-02")["nDCG@10"].to_pylist() == [0.45, 0.45]
    assert history.previous_night("2024-05-02") == "2024-05-01"
    assert history.previous_night("2024-06-01") == "2024-05-02"
    assert not [
        p for p in history.fs.find(history.root) if p.endswith(".tmp")
    ]  # temp files moved into place


def test_nights_out_of_order_and_new_measures(tmp_path):
    history = History(str(tmp_path / "h"))
    history.append(*_night("2024-05-03", 0.3, **{"R@100": 0.7}))
    history.append(*_night("2024-05-01", 0.1))  # a backfill of an earlier night
    table = history.read()
    assert table["night"].to_pylist() == ["2024-05-01", "2024-05-03"]
    assert table["R@100"].to_pylist() == [
        None,
        0.7,
    ]  # the older night simply lacks the newer measure
    assert history.previous_night("2024-05-03") == "2024-05-01"


def test_a_folder_that_is_not_a_history_is_refused(tmp_path):
    (tmp_path / "h").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "h" / "history.parquet")
    with pytest.raises(InputError, match="has no `night` column.*pass this index's history folder"):
        History(str(tmp_path / "h")).read()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda h: (h / "history.parquet").write_bytes(b"PAR1 half a file"),
            "is not a readable Parquet file",
        ),
        (
            lambda h: pq.write_table(
                pa.table({"night": ["2024-05-01"], "nDCG@10": ["high"]}), h / "history.parquet"
            ),
            "measure column `nDCG@10` has type string, not a number",
        ),
        (
            lambda h: pq.write_table(
                pa.table({"night": ["May 1st"], "nDCG@10": [0.5]}), h / "history.parquet"
            ),
            "night 'May 1st' is not a date YYYY-MM-DD",
        ),
        (
            lambda h: pq.write_table(
                pa.table({"night": ["2024-05-01"] * 2, "nDCG@10": [0.5, 0.4]}),
                h / "history.parquet",
            ),
            "night 2024-05-01 has more than one row",
        ),
    ],
)
def test_a_damaged_history_table_is_one_line_naming_it(tmp_path, damage, message):
    history = History(str(tmp_path / "h"))
    history.append(*_night("2024-05-01", 0.5))
    damage(tmp_path / "h")
    with pytest.raises(
        InputError, match=f"history.parquet .*{message}.*restore its history.parquet from a backup"
    ):
        history.previous_night("2024-05-02")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b"not parquet"), "is not a readable Parquet file"),
        (
            lambda p: pq.write_table(pa.table({"qid": ["q1"], "nDCG@10": [0.5]}), p),
            "has no `query_id` column",
        ),
        (
            lambda p: pq.write_table(pa.table({"query_id": ["q1"], "nDCG@10": ["x"]}), p),
            "measure column `nDCG@10` has type string",
        ),
    ],
)
def test_a_damaged_per_query_file_is_one_line_saying_what_deleting_it_costs(
    tmp_path, damage, message
):
    history = History(str(tmp_path / "h"))
    history.append(*_night("2024-05-01", 0.5))
    damage(tmp_path / "h" / "per_query" / "2024-05-01.parquet")
    with pytest.raises(
        InputError,
        match=f"per_query/2024-05-01.parquet .*{message}.*delete per_query/2024-05-01"
        r"\.parquet \(tonight is then not compared",
    ):
        history.read_per_query("2024-05-01")


def test_the_job_with_a_damaged_history_exits_2_with_one_line(
    dl19_long, dl19_qrels, tmp_path, run_entry_point
):
    from jobs.index_quality import main

    history = tmp_path / "history"
    history.mkdir()
    (history / "history.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    result = run_entry_point(
        main,
        "--run",
        dl19_long,
        "--qrels",
        dl19_qrels,
        "--output",
        tmp_path / "out",
        "--history",
        history,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr[
        -2000:
    ]
    assert (
        "history.parquet is not a readable Parquet file" in errors[0] and str(history) in errors[0]
    )
