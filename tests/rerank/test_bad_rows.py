"""Bad rows and bad files: every input row is ranked or rejected with its reason, exactly once.

Invalid UTF-8 in string columns, duplicate pairs (rejected with their input columns, re-read from the input),
Parquet files whose data pages are corrupt (`input.on_unreadable`: fail | reject), and each of them in windows
mode and on a rerun. The files are made for real: invalid bytes written through a binary column relabelled as
string (what a writer that skips validation produces), corruption by overwriting bytes in the middle of a
column chunk's pages of a real file (its footer stays intact).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema as S
from pipeline.core.config import build_config
from pipeline.core.errors import InputError
from pipeline.core.storage import url_to_fs
from pipeline.model import CrossEncoder
from pipeline.rerank.config import InputConfig, RerankConfig
from pipeline.rerank.job import run_rerank
from pipeline.rerank.stages.read import ReadShard, plan_shards
from pipeline.rerank.stages.validate import InputLayout, invalid_utf8

from .conftest import read_dir

SNAPPY = "Corrupt snappy compressed data."
REPLACED = "\ufffd"  # what an invalid byte sequence reads as in rejected/


# -- making bad files ------------------------------------------------------------------------------------


def _strings(values: list, bad: dict[int, bytes]) -> pa.Array:
    """A string array whose rows `bad` hold raw bytes that are not UTF-8 (pyarrow does not check a view)."""
    raw = [
        bad[i] if i in bad else (None if v is None else v.encode()) for i, v in enumerate(values)
    ]
    return pa.array(raw, pa.binary()).view(pa.string())


def _corrupt(path: Path, group: int, column: str) -> None:
    """Overwrite 64 bytes in the middle of one column chunk's pages; the footer is left as it was."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(
        meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column
    )
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _fail_message(path: Path, group: int, detail: str = SNAPPY) -> str:
    return (
        f"{path}: row group {group} cannot be decoded ({detail}); replace or remove the file, or set "
        "input.on_unreadable=reject to reject its rows"
    )


def _long_rows(dl19_rows, n: int, start: int = 0) -> list[dict]:
    return [
        dict(
            query_id=str(r["query_id"]),
            query=r["query"],
            doc_id=r["doc_id"],
            document=r["document"],
            rank=r["rank"],
        )
        for r in dl19_rows[start : start + n]
    ]


def _grouped(rows: list[dict]) -> list[dict]:
    by_query: dict = {}
    for r in rows:
        q = by_query.setdefault(
            r["query_id"], {"query_id": r["query_id"], "query": r["query"], "candidates": []}
        )
        q["candidates"].append(
            {"doc_id": r["doc_id"], "document": r["document"], "rank": r["rank"]}
        )
    return list(by_query.values())


def _reader(path: Path, rows_per_shard: int = 10**9, **config):
    layout = InputLayout.from_schemas([pq.read_schema(path)], InputConfig(**config))
    fs, p = url_to_fs(str(path))
    return plan_shards(fs, [p], layout, rows_per_shard), ReadShard(layout, {}, str(path))


def _read_all(path: Path, **config) -> pa.Table:
    shards, reader = _reader(path, **config)
    return pa.concat_tables([reader.read(s) for s in shards])


# -- invalid UTF-8 (no Ray) ------------------------------------------------------------------------------


def test_invalid_utf8_rows_are_rejected_and_their_bytes_replaced(dl19_rows, tmp_path):
    rows = _long_rows(dl19_rows, 8)
    columns = {k: [r[k] for r in rows] for k in ("query_id", "query", "doc_id", "document")}
    lang = ["en"] * 8
    table = pa.table(
        {
            "query_id": _strings(columns["query_id"], {4: b"q\x80"}),
            "query": _strings(columns["query"], {1: b"caf\xe9 au lait"}),  # latin-1, not UTF-8
            "doc_id": _strings(columns["doc_id"], {6: b"d\xc3"}),  # a truncated 2-byte sequence
            "document": _strings(columns["document"], {3: b"\xff\xfe broken"}),
            "lang": _strings(lang, {7: b"\xe9n"}),  # a carried column
        }
    )
    path = tmp_path / "latin1.parquet"
    pq.write_table(table, path)
    # The file itself reads fine: the bytes fail only where something decodes them.
    stored = pq.read_table(path)
    with pytest.raises(UnicodeDecodeError):
        stored.column("query").to_pylist()

    read = _read_all(path)
    assert read.column(S.REASON).to_pylist() == [
        None,
        "invalid_utf8",
        None,
        "invalid_utf8",
        "invalid_utf8",
        None,
        "invalid_utf8",
        "invalid_utf8",
    ]
    read.validate(full=True)  # every string is UTF-8 from here on
    assert read.column(S.QUERY)[1].as_py() == f"caf{REPLACED} au lait"
    assert read.column(S.DOCUMENT)[3].as_py() == f"{REPLACED}{REPLACED} broken"
    assert read.column(S.QUERY_ID)[4].as_py() == f"q{REPLACED}"
    assert read.column(S.DOC_ID)[6].as_py() == f"d{REPLACED}"
    assert read.column("lang").to_pylist() == ["en"] * 7 + [f"{REPLACED}n"]
    # Everything else is the input, untouched.
    for k in ("query_id", "query", "doc_id", "document"):
        got = read.column(k).to_pylist()
        assert [g for i, g in enumerate(got) if i not in (1, 3, 4, 6)] == [
            v for i, v in enumerate(columns[k]) if i not in (1, 3, 4, 6)
        ]


def test_invalid_utf8_in_grouped_queries_and_candidate_documents(tmp_path):
    docs = _strings(
        ["one", "two", "three", "four", "five", "six"], {1: b"tw\xf0\x9f"}
    )  # cut-off emoji
    fields = [pa.field("doc_id", pa.string()), pa.field("document", pa.string())]
    values = pa.StructArray.from_arrays(
        [pa.array(["d1", "d2", "d3", "d4", "d5", "d6"]), docs], fields=fields
    )
    candidates = pa.ListArray.from_arrays(pa.array([0, 3, 5, 5, 6], pa.int32()), values)
    table = pa.table(
        {
            "query_id": ["q1", "q2", "q3", "q4"],
            "query": _strings(["cats", "dogs", "cows", "owls"], {1: b"d\xf6gs"}),
            "candidates": candidates,
        }
    )
    path = tmp_path / "grouped.parquet"
    pq.write_table(table, path)
    read = _read_all(path)
    assert read.column(S.QUERY_ID).to_pylist() == ["q1", "q1", "q1", "q2", "q2", "q3", "q4"]
    assert read.column(S.REASON).to_pylist() == [
        None,
        "invalid_utf8",
        None,
        "invalid_utf8",
        "invalid_utf8",
        "query has no candidates",
        None,
    ]
    assert read.column(S.DOCUMENT).to_pylist() == [
        "one",
        f"tw{REPLACED}",
        "three",
        "four",
        "five",
        None,
        "six",
    ]
    assert read.column(S.QUERY).to_pylist()[3:5] == [f"d{REPLACED}gs"] * 2
    assert read.column("_row").to_pylist() == list(range(7))


def test_invalid_utf8_mask_is_exact_across_blocks_and_chunks():
    values = [f"text {i}" for i in range(3000)]
    values[7] = None
    column = _strings(
        values, {0: b"\xff", 1500: b"ok \xc0\xaf", 2999: b"\xed\xa0\x80"}
    )  # overlong, surrogate
    assert np.flatnonzero(invalid_utf8(column)).tolist() == [0, 1500, 2999]
    chunked = pa.chunked_array([column.slice(0, 1000), column.slice(1000)])
    assert np.flatnonzero(invalid_utf8(chunked)).tolist() == [0, 1500, 2999]
    assert not invalid_utf8(pa.array(["ok", None, "🙂"])).any()


# -- corrupt data pages (no Ray) -------------------------------------------------------------------------


def test_corrupt_row_group_fails_with_one_line_or_rejects_its_rows(dl19_rows, tmp_path):
    rows = _long_rows(dl19_rows, 1500)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500)
    _corrupt(path, 1, "document")
    shards, reader = _reader(path, rows_per_shard=1000)
    assert [(s.row_groups, s.num_pairs) for s in shards] == [
        ((0, 1), 1000),
        ((2,), 500),
    ]  # the footer is fine
    with pytest.raises(InputError) as failed:
        reader.read(shards[0])
    assert str(failed.value) == _fail_message(path, 1)

    shards, reader = _reader(path, rows_per_shard=1000, on_unreadable="reject")
    table = pa.concat_tables([reader.read(s) for s in shards])
    assert table.num_rows == 1500
    reasons = table.column(S.REASON).to_pylist()
    assert reasons == [None] * 500 + ["unreadable_file"] * 500 + [None] * 500
    # Only the document chunk is corrupt: the other columns of the rejected rows are still read.
    bad = table.slice(500, 500)
    assert bad.column(S.DOC_ID).to_pylist() == [r["doc_id"] for r in rows[500:1000]]
    assert bad.column(S.QUERY).to_pylist() == [r["query"] for r in rows[500:1000]]
    assert bad.column(S.FIRST_STAGE_RANK).to_pylist() == [r["rank"] for r in rows[500:1000]]
    assert bad.column(S.DOCUMENT).null_count == 500
    assert table.column("_row").to_pylist() == list(range(1000)) + [
        (1 << 32) + i for i in range(500)
    ]


def test_grouped_corrupt_documents_keep_the_pairs_corrupt_doc_ids_count_queries(
    dl19_rows, tmp_path
):
    queries = _grouped(_long_rows(dl19_rows, 1200))  # 12 queries of 100 candidates
    for column, group, expected_rows in (
        ("candidates.list.element.document", 1, 300),
        ("candidates.list.element.doc_id", 2, 3),
    ):
        path = tmp_path / f"{column.rsplit('.', 1)[1]}.parquet"
        pq.write_table(pa.Table.from_pylist(queries), path, row_group_size=3)
        _corrupt(path, group, column)
        with pytest.raises(InputError) as failed:
            _read_all(path)  # doc ids are read when planning, documents when reading
        assert str(failed.value) == _fail_message(path, group)

        shards, reader = _reader(path, on_unreadable="reject")
        assert shards[0].group_pairs == tuple(
            expected_rows if g == group else 300 for g in range(4)
        )
        table = pa.concat_tables([reader.read(s) for s in shards])
        assert table.num_rows == 900 + expected_rows
        bad = table.filter(pc.equal(table.column(S.REASON), "unreadable_file"))
        assert bad.num_rows == expected_rows
        assert table.filter(pc.is_null(table.column(S.REASON))).num_rows == 900
        source = queries[3 * group : 3 * group + 3]
        if expected_rows == 300:  # documents lost; the pairs, ids and ranks are known
            assert bad.column(S.DOC_ID).to_pylist() == [
                c["doc_id"] for q in source for c in q["candidates"]
            ]
            assert bad.column(S.FIRST_STAGE_RANK).to_pylist() == [
                c["rank"] for q in source for c in q["candidates"]
            ]
            assert bad.column(S.DOCUMENT).null_count == 300
        else:  # candidates not even countable: one row per query
            assert bad.column(S.QUERY_ID).to_pylist() == [q["query_id"] for q in source]
            assert bad.column(S.QUERY).to_pylist() == [q["query"] for q in source]
            assert bad.column(S.DOC_ID).null_count == 3


def test_page_checksums_turn_silent_corruption_into_unreadable(dl19_rows, tmp_path):
    path = tmp_path / "crc.parquet"
    pq.write_table(
        pa.Table.from_pylist(_long_rows(dl19_rows, 1000)),
        path,
        row_group_size=500,
        compression="none",
        use_dictionary=False,
        write_page_checksum=True,
    )
    rows = _long_rows(dl19_rows, 1000)
    data = bytearray(path.read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(3)
    at = (
        data.index(rows[700]["document"].encode(), chunk.data_page_offset) + 10
    )  # inside one document's text
    data[at : at + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    # Uncompressed pages decode whatever their bytes are: without the checksum this is wrong text, no error.
    unchecked = pq.ParquetFile(path).read_row_group(1).column("document").to_pylist()
    assert sum("XXXX" in d for d in unchecked) == 1
    table = _read_all(path, on_unreadable="reject")
    assert table.column(S.REASON).to_pylist() == [None] * 500 + ["unreadable_file"] * 500
    with pytest.raises(InputError) as failed:
        _read_all(path)
    assert str(failed.value) == _fail_message(
        path,
        1,
        "could not verify page integrity, CRC checksum verification failed for page_ordinal 0",
    )


def test_rows_are_found_again_by_their_key(tmp_path):
    """`read_rows` re-reads rows by `_row` from their row group alone; grouped input's explode (a query
    without candidates is one row) maps back the same way."""
    queries = [
        {
            "query_id": f"q{i}",
            "query": f"query {i}",
            "candidates": [
                {"doc_id": f"d{i}-{j}", "document": f"doc {i} {j}"} for j in range(i % 4)
            ],
        }
        for i in range(20)
    ]
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(queries), path, row_group_size=6)
    shards, reader = _reader(path, rows_per_shard=21)  # pairs per row group: 9, 12, 9, 5
    assert [(s.row_groups, s.group_pairs) for s in shards] == [((0, 1), (9, 12)), ((2, 3), (9, 5))]
    for shard in shards:
        whole = reader.read(shard).drop_columns(["_shard", "_row"])
        index = np.array([0, 3, whole.num_rows // 2, whole.num_rows - 1])
        again = pa.concat_tables(list(reader.read_rows(shard, index)))
        assert again.equals(whole.take(pa.array(index)))


# -- end to end on a real local Ray -----------------------------------------------------------------------


def _config(**overrides) -> RerankConfig:
    base = {
        "model": "dummy:tiny",
        "dtype": "float32",
        "progress_interval_s": 1.0,
        "input": {"rows_per_shard": 500},
        "tokenizer": {"max_length": 256},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        base.setdefault(section, {})[name] = value
    return build_config(RerankConfig, base)


def _reconciled(output: Path, input_rows: int) -> tuple[dict, pa.Table, pa.Table]:
    """summary.json, ranked/ and rejected/, once checked that ranked + rejected rows = input rows."""
    summary = json.loads((output / "summary.json").read_text())
    ranked, rejected = read_dir(output / "ranked"), read_dir(output / "rejected")
    rejected_rows = 0 if rejected is None else rejected.num_rows
    assert summary["input_rows"] == input_rows
    assert ranked.num_rows == summary["scored_rows"] and rejected_rows == summary["rejected_rows"]
    assert ranked.num_rows + rejected_rows == input_rows
    keys = list(zip(ranked.column(S.QUERY_ID).to_pylist(), ranked.column(S.DOC_ID).to_pylist()))
    assert len(keys) == len(set(keys))
    assert not (output / "_work").exists()
    return summary, ranked, rejected


def _ordered(table: pa.Table, columns: list[str]) -> list[dict]:
    return sorted(table.select(columns).to_pylist(), key=lambda r: [str(r[c]) for c in columns])


@pytest.mark.slow
def test_invalid_utf8_is_rejected_end_to_end(ray_local, dl19_rows, tmp_path):
    rows = _long_rows(dl19_rows, 300)
    cols = {k: [r[k] for r in rows] for k in ("query_id", "query", "doc_id", "document")}
    long = pa.table(
        {
            "query_id": _strings(cols["query_id"], {10: b"\x80"}),
            "query": _strings(cols["query"], {20: b"caf\xe9"}),
            "doc_id": _strings(cols["doc_id"], {130: b"\xc3("}),
            "document": _strings(cols["document"], {140: b"\xff" * 3}),
        }
    )
    pq.write_table(long.slice(0, 200), tmp_path / "long.parquet", row_group_size=100)
    summary, ranked, rejected = _reconciled(
        _run(tmp_path / "long.parquet", tmp_path / "out-long", input__rows_per_shard=100), 200
    )
    assert summary["rejected_by_reason"] == {"invalid_utf8": 4}
    assert _ordered(rejected, [S.QUERY_ID, S.QUERY, S.DOC_ID, S.REASON]) == _ordered(
        pa.Table.from_pylist(
            [
                dict(
                    query_id=REPLACED,
                    query=rows[10]["query"],
                    doc_id=rows[10]["doc_id"],
                    reason="invalid_utf8",
                ),
                dict(
                    query_id=rows[20]["query_id"],
                    query=f"caf{REPLACED}",
                    doc_id=rows[20]["doc_id"],
                    reason="invalid_utf8",
                ),
                dict(
                    query_id=rows[130]["query_id"],
                    query=rows[130]["query"],
                    doc_id=f"{REPLACED}(",
                    reason="invalid_utf8",
                ),
                dict(
                    query_id=rows[140]["query_id"],
                    query=rows[140]["query"],
                    doc_id=rows[140]["doc_id"],
                    reason="invalid_utf8",
                ),
            ]
        ),
        [S.QUERY_ID, S.QUERY, S.DOC_ID, S.REASON],
    )
    assert set(zip(ranked.column(S.QUERY_ID).to_pylist(), ranked.column(S.DOC_ID).to_pylist())) == {
        (r["query_id"], r["doc_id"])
        for i, r in enumerate(rows[:200])
        if i not in (10, 20, 130, 140)
    }

    # Grouped: a bad query rejects its 100 pairs, a bad candidate document only its own pair.
    queries = _grouped(rows[:300])
    docs = [c["document"] for q in queries for c in q["candidates"]]
    fields = [
        pa.field("doc_id", pa.string()),
        pa.field("document", pa.string()),
        pa.field("rank", pa.int64()),
    ]
    values = pa.StructArray.from_arrays(
        [
            pa.array([c["doc_id"] for q in queries for c in q["candidates"]]),
            _strings(docs, {5: b"\xfe", 250: b"x\xff"}),
            pa.array([c["rank"] for q in queries for c in q["candidates"]]),
        ],
        fields=fields,
    )
    grouped = pa.table(
        {
            "query_id": [q["query_id"] for q in queries],
            "query": _strings([q["query"] for q in queries], {1: b"\xe9t\xe9"}),
            "candidates": pa.ListArray.from_arrays(
                pa.array([0, 100, 200, 300], pa.int32()), values
            ),
        }
    )
    pq.write_table(grouped, tmp_path / "grouped.parquet", row_group_size=1)
    summary, ranked, rejected = _reconciled(
        _run(tmp_path / "grouped.parquet", tmp_path / "out-grouped"), 300
    )
    assert summary["rejected_by_reason"] == {"invalid_utf8": 102}
    assert sorted(set(rejected.column(S.QUERY).to_pylist())) == sorted(
        {queries[0]["query"], queries[2]["query"], f"{REPLACED}t{REPLACED}"}
    )
    replaced = sorted(d for d in rejected.column(S.DOCUMENT).to_pylist() if REPLACED in d)
    assert replaced == sorted([REPLACED, f"x{REPLACED}"])
    assert ranked.num_rows == 198 and queries[1]["query_id"] not in set(
        ranked.column(S.QUERY_ID).to_pylist()
    )


def _run(path: Path, output: Path, **overrides) -> Path:
    run_rerank(_config(**overrides), str(path), str(output))
    return output


@pytest.mark.slow
def test_duplicates_keep_their_input_columns_long(ray_local, dl19_rows, tmp_path):
    rows = [dict(r, source="first") for r in _long_rows(dl19_rows, 400)]
    # Repeats of earlier pairs with texts and carried values of their own: each is rejected with its own row.
    rows[300] = dict(rows[10], document="a second copy", rank=301, source="repeat")  # across shards
    rows[399] = dict(
        rows[398], query="same pair, other query text", rank=400, source="repeat"
    )  # same shard
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=100)
    out = _run(
        tmp_path / "in.parquet",
        tmp_path / "out",
        input__rows_per_shard=200,
        output__rows_per_bucket=120,
    )
    summary, ranked, rejected = _reconciled(out, 400)
    assert summary["shards"] == 2 and summary["ranking_buckets"] == 4
    assert summary["rejected_by_reason"] == {"duplicate (query_id, doc_id)": 2}
    expected = [
        dict(rows[i], first_stage_rank=rows[i]["rank"], reason="duplicate (query_id, doc_id)")
        for i in (300, 399)
    ]
    columns = [S.QUERY_ID, S.QUERY, S.DOC_ID, S.DOCUMENT, S.FIRST_STAGE_RANK, "source", S.REASON]
    assert _ordered(rejected, columns) == _ordered(pa.Table.from_pylist(expected), columns)
    assert set(ranked.column("source").to_pylist()) == {"first"}


@pytest.mark.slow
def test_duplicates_keep_their_input_columns_grouped(ray_local, tmp_path):
    def cand(doc_id, document, rank):
        return {"doc_id": doc_id, "document": document, "rank": rank}

    # Row group 0: a query without candidates, then one listing d1 twice; row group 1 the same again. The
    # rejected copies sit after the exploded rows of an empty query: their keys must still find them.
    queries = [
        {"query_id": "a", "query": "nothing", "candidates": []},
        {
            "query_id": "b",
            "query": "cats",
            "candidates": [
                cand("d1", "a cat", 1),
                cand("d2", "a dog", 2),
                cand("d1", "a cat, again", 3),
            ],
        },
        {"query_id": "c", "query": "owls", "candidates": []},
        {
            "query_id": "d",
            "query": "cows",
            "candidates": [cand("d9", "a cow", 1), cand("d9", "a calf", 2)],
        },
    ]
    pq.write_table(pa.Table.from_pylist(queries), tmp_path / "unique.parquet", row_group_size=2)
    summary, ranked, rejected = _reconciled(_run(tmp_path / "unique.parquet", tmp_path / "out1"), 7)
    assert summary["ranking_buckets"] == summary["shards"] == 1  # per-shard ranking, no shuffle
    assert summary["rejected_by_reason"] == {
        "duplicate (query_id, doc_id)": 2,
        "query has no candidates": 2,
    }
    duplicates = rejected.filter(
        pc.equal(rejected.column(S.REASON), "duplicate (query_id, doc_id)")
    )
    columns = [S.QUERY_ID, S.QUERY, S.DOC_ID, S.DOCUMENT, S.FIRST_STAGE_RANK]
    assert _ordered(duplicates, columns) == [
        dict(query_id="b", query="cats", doc_id="d1", document="a cat, again", first_stage_rank=3),
        dict(query_id="d", query="cows", doc_id="d9", document="a calf", first_stage_rank=2),
    ]

    # The same query id in two rows (two shards): ranked through hash buckets; the repeat is in shard 1.
    repeated = [
        {
            "query_id": "q",
            "query": "cats",
            "candidates": [cand("d1", "a cat", 1), cand("d2", "a dog", 2)],
        },
        {
            "query_id": "q",
            "query": "cats?",
            "candidates": [cand("d3", "a cow", 1), cand("d1", "one cat", 2)],
        },
    ]
    pq.write_table(pa.Table.from_pylist(repeated), tmp_path / "repeated.parquet", row_group_size=1)
    summary, ranked, rejected = _reconciled(
        _run(tmp_path / "repeated.parquet", tmp_path / "out2", input__rows_per_shard=1), 4
    )
    assert summary["shards"] == 2 and summary["ranking_buckets"] == 1
    assert rejected.select(columns + [S.REASON]).to_pylist() == [
        dict(
            query_id="q",
            query="cats?",
            doc_id="d1",
            document="one cat",
            first_stage_rank=2,
            reason="duplicate (query_id, doc_id)",
        )
    ]


@pytest.fixture
def own_logging():
    """The job's `main` installs its own log handler on the root logger (bound to the stderr pytest captures,
    closed after the test): put back what was there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.slow
def test_corrupt_file_stops_the_job_with_one_line(
    ray_local, dl19_rows, tmp_path, capfd, own_logging
):
    from jobs.rerank import main
    from pipeline.core.cli import run_main

    rows = _long_rows(dl19_rows, 1000)
    pq.write_table(pa.Table.from_pylist(rows[:400]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[400:]), tmp_path / "b.parquet", row_group_size=300)
    _corrupt(tmp_path / "b.parquet", 1, "document")
    args = [
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=300",
        "--set",
        "tokenizer.max_length=256",
    ]
    capfd.readouterr()
    for _ in range(2):  # a rerun on the same output (same input, same settings) stops the same way
        with pytest.raises(SystemExit) as exit_:
            run_main(main, args)
        assert exit_.value.code == 2
        err = capfd.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: {_fail_message(tmp_path / 'b.parquet', 1)}"
        ]
        assert "Traceback" not in err
        assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.slow
def test_corrupt_row_groups_rejected_and_their_shard_commits(ray_local, dl19_rows, tmp_path):
    rows = _long_rows(dl19_rows, 300)
    pq.write_table(pa.Table.from_pylist(rows[:100]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[100:]), tmp_path / "b.parquet", row_group_size=100)
    _corrupt(tmp_path / "b.parquet", 1, "document")  # b's second row group is a shard of its own
    summary, ranked, rejected = _reconciled(
        _run(tmp_path, tmp_path / "out", input__on_unreadable="reject", input__rows_per_shard=100),
        300,
    )
    assert summary["shards"] == 3 and summary["rejected_by_reason"] == {"unreadable_file": 100}
    assert sorted(rejected.column(S.DOC_ID).to_pylist()) == sorted(r["doc_id"] for r in rows[200:])
    assert rejected.column(S.DOCUMENT).null_count == 100
    assert sorted(ranked.column(S.DOC_ID).to_pylist()) == sorted(r["doc_id"] for r in rows[:200])

    # Grouped input whose doc ids cannot be read: each of its queries is one rejected row.
    queries = _grouped(_long_rows(dl19_rows, 300))  # 3 queries of 100 candidates
    pq.write_table(pa.Table.from_pylist(queries), tmp_path / "g.parquet", row_group_size=1)
    _corrupt(tmp_path / "g.parquet", 1, "candidates.list.element.doc_id")
    summary, ranked, rejected = _reconciled(
        _run(
            tmp_path / "g.parquet",
            tmp_path / "out-g",
            input__on_unreadable="reject",
            input__rows_per_shard=100,
        ),
        201,
    )
    assert summary["rejected_by_reason"] == {"unreadable_file": 1}
    assert rejected.select([S.QUERY_ID, S.DOC_ID, S.REASON]).to_pylist() == [
        dict(query_id=q["query_id"], doc_id=None, reason="unreadable_file") for q in queries[1:2]
    ]
    assert ranked.num_rows == 200


@pytest.mark.slow
def test_every_fault_in_windows_mode(ray_local, dl19_rows, tmp_path):
    engine = CrossEncoder.from_pretrained("dummy:tiny", dtype="float32")
    query = dl19_rows[0]["query"]
    long_doc = " ".join(r["document"] for r in dl19_rows[:30])
    docs = [
        long_doc,
        dl19_rows[1]["document"],
        "a repeat of the long one",
        "caf\xe9",
        dl19_rows[2]["document"],
    ]
    table = pa.table(
        {
            "query_id": ["q"] * 5,
            "query": [query] * 5,
            "doc_id": ["long", "short", "long", "latin1", "other"],
            "document": _strings(docs, {3: b"caf\xe9"}),
        }
    )
    corrupt = pa.table(
        {
            "query_id": ["r"] * 3,
            "query": [query] * 3,
            "doc_id": ["x", "y", "z"],
            "document": [long_doc] * 3,
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(corrupt, tmp_path / "b.parquet")
    _corrupt(tmp_path / "b.parquet", 0, "document")
    out = _run(
        tmp_path,
        tmp_path / "out",
        input__on_unreadable="reject",
        tokenizer__long_documents="windows",
        tokenizer__max_query_length=64,
    )
    summary, ranked, rejected = _reconciled(out, 8)
    assert summary["rejected_by_reason"] == {
        "duplicate (query_id, doc_id)": 1,
        "invalid_utf8": 1,
        "unreadable_file": 3,
    }
    assert _ordered(rejected, [S.DOC_ID, S.DOCUMENT, S.REASON]) == [
        dict(doc_id="latin1", document=f"caf{REPLACED}", reason="invalid_utf8"),
        dict(
            doc_id="long",
            document="a repeat of the long one",
            reason="duplicate (query_id, doc_id)",
        ),
        dict(doc_id="x", document=None, reason="unreadable_file"),
        dict(doc_id="y", document=None, reason="unreadable_file"),
        dict(doc_id="z", document=None, reason="unreadable_file"),
    ]
    # The kept "long" is the first in input order, scored as its best window, like jina's rerank().
    expected = engine.rerank(
        query, [docs[0], docs[1], docs[4]], max_length=256, max_query_length=64
    )
    got = dict(zip(ranked.column(S.DOC_ID).to_pylist(), ranked.column(S.SCORE).to_pylist()))
    for r, doc_id in zip(sorted(expected, key=lambda r: r["index"]), ["long", "short", "other"]):
        assert 1 / (1 + math.exp(-got[doc_id])) == pytest.approx(r["relevance_score"], abs=1e-5)


@pytest.mark.slow
def test_resumed_run_counts_every_bad_row_once(ray_local, dl19_rows, tmp_path):
    """A run that dies after scoring (its ranking cannot write) is resumed: the committed shards' rejected
    rows are counted once, and their duplicates are re-read from the input by the rerun's rankers."""
    rows = _long_rows(dl19_rows, 200)
    rows[150] = dict(rows[5], document="a later copy")
    cols = {k: [r[k] for r in rows] for k in ("query_id", "query", "doc_id", "document", "rank")}
    table = pa.table(
        {
            **{k: cols[k] for k in ("query_id", "query", "doc_id")},
            "document": _strings(cols["document"], {7: b"\xff", 180: b"\xc3"}),
            "rank": cols["rank"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ranked").write_text("a file where the ranked folder should be")
    with pytest.raises(Exception, match="ranked"):
        run_rerank(_config(input__rows_per_shard=100), str(tmp_path / "in.parquet"), str(out))
    assert (
        len(list((out / "_work" / "manifests").glob("shard-*.json"))) == 2
    )  # scoring had finished
    (out / "ranked").unlink()
    summary = run_rerank(_config(input__rows_per_shard=100), str(tmp_path / "in.parquet"), str(out))
    assert summary["shards_resumed"] == 2
    summary, ranked, rejected = _reconciled(out, 200)
    assert summary["rejected_by_reason"] == {"duplicate (query_id, doc_id)": 1, "invalid_utf8": 2}
    assert _ordered(rejected, [S.DOC_ID, S.DOCUMENT, S.REASON]) == _ordered(
        pa.Table.from_pylist(
            [
                dict(
                    doc_id=rows[5]["doc_id"],
                    document="a later copy",
                    reason="duplicate (query_id, doc_id)",
                ),
                dict(doc_id=rows[7]["doc_id"], document=REPLACED, reason="invalid_utf8"),
                dict(doc_id=rows[180]["doc_id"], document=REPLACED, reason="invalid_utf8"),
            ]
        ),
        [S.DOC_ID, S.DOCUMENT, S.REASON],
    )
