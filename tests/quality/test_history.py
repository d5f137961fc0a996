"""The nightly history on a local folder and on a real S3 server: one row per night, reruns replace it."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.quality.history import History


def _night(night: str, ndcg: float, **more) -> tuple[dict, pa.Table]:
    row = {"night": night, "written_at": dt.datetime.now(dt.timezone.utc), "run": "r", "num_queries": 2,
           "config_hash": "h", "nDCG@10": ndcg, **more}
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
    assert not [p for p in history.fs.find(history.root) if p.endswith(".tmp")]  # temp files moved into place


def test_nights_out_of_order_and_new_measures(tmp_path):
    history = History(str(tmp_path / "h"))
    history.append(*_night("2024-05-03", 0.3, **{"R@100": 0.7}))
    history.append(*_night("2024-05-01", 0.1))  # a backfill of an earlier night
    table = history.read()
    assert table["night"].to_pylist() == ["2024-05-01", "2024-05-03"]
    assert table["R@100"].to_pylist() == [None, 0.7]  # the older night simply lacks the newer measure
    assert history.previous_night("2024-05-03") == "2024-05-01"


def test_a_folder_that_is_not_a_history_is_refused(tmp_path):
    (tmp_path / "h").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "h" / "history.parquet")
    with pytest.raises(InputError, match="no `night` column"):
        History(str(tmp_path / "h")).read()
