"""Benchmark workloads: sizes, lengths, scripts, determinism; and the command line that writes them."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.datasets import dl19, long, multilingual
from pipeline.datasets.__main__ import main
from pipeline.datasets.workloads import describe, estimate_tokens


def test_dl19_is_the_4300_bm25_pairs(shared_data):
    pairs = dl19(shared_data)
    assert describe(pairs)["pairs"] == 4300 and describe(pairs)["queries"] == 43
    assert dl19(shared_data, n_pairs=20_000).num_rows == 20_000


def test_long_documents_fall_in_the_token_range(shared_data):
    pairs = long(shared_data, n_pairs=400, min_tokens=300, max_tokens=1000)
    assert pairs.num_rows == 400
    # Lengths as the workload counts them: the sum over the joined abstracts.
    lengths = np.array(
        [
            sum(estimate_tokens(part) for part in document.split("\n\n"))
            for document in pairs[schema.DOCUMENT].to_pylist()
        ]
    )
    assert lengths.min() >= 300 and lengths.max() <= 1000
    assert np.median(lengths) > 500  # targets are spread over the range, not piled at its bottom
    assert pc.min(pairs["num_parts"]).as_py() >= 2
    assert long(shared_data, n_pairs=400).equals(pairs)
    # A real tokenizer's count plugs in; with characters as "tokens", every document reaches 300 characters.
    by_chars = long(shared_data, n_pairs=50, count_tokens=len, min_tokens=300, max_tokens=1000)
    for document in by_chars[schema.DOCUMENT].to_pylist():
        assert sum(len(part) for part in document.split("\n\n")) >= 300
    assert not by_chars[schema.DOCUMENT].equals(pairs[schema.DOCUMENT].slice(0, 50))
    with pytest.raises(InputError, match="min_tokens <= max_tokens"):
        long(shared_data, min_tokens=500, max_tokens=400)


def test_multilingual_mixes_scripts_in_any_prefix(shared_data):
    pairs = multilingual(shared_data, n_pairs=2000)
    assert pairs.num_rows == 2000
    assert set(pairs["language"].to_pylist()) == {"ar", "de", "en", "es", "hi", "ru", "th", "zh"}
    text = "".join(pairs[schema.DOCUMENT].to_pylist())
    for low, high in [
        (0x0600, 0x06FF),
        (0x0900, 0x097F),
        (0x0400, 0x04FF),
        (0x0E00, 0x0E7F),
        (0x4E00, 0x9FFF),
    ]:
        assert any(low <= ord(c) <= high for c in text), hex(
            low
        )  # Arabic, Devanagari, Cyrillic, Thai, Han
    assert multilingual(shared_data, n_pairs=2000).equals(pairs)


def test_cli_writes_pairs_and_qrels(shared_data, tmp_path, capsys):
    pairs_path, qrels_path = tmp_path / "out" / "spider.parquet", tmp_path / "qrels.txt"
    assert (
        main(
            [
                "spider",
                "--data-dir",
                str(shared_data),
                "--max-queries",
                "30",
                "--output",
                str(pairs_path),
                "--qrels-output",
                str(qrels_path),
            ]
        )
        == 0
    )
    pairs, qrels = pq.read_table(pairs_path), read_qrels(str(qrels_path))
    assert len(pc.unique(pairs[schema.QUERY_ID])) == 30 and qrels.num_rows == pairs.num_rows
    assert '"queries": 30' in capsys.readouterr().out

    parquet_qrels = tmp_path / "qrels.parquet"
    main(
        [
            "trec_dl",
            "--data-dir",
            str(shared_data),
            "--set",
            "year=2020",
            "--output",
            str(tmp_path / "dl20.parquet"),
            "--qrels-output",
            str(parquet_qrels),
        ]
    )
    assert pq.read_table(parquet_qrels).num_rows == 11386

    main(
        [
            "long",
            "--data-dir",
            str(shared_data),
            "--n-pairs",
            "123",
            "--set",
            "max_tokens=500",
            "--output",
            str(tmp_path / "long.parquet"),
        ]
    )
    assert pq.read_table(tmp_path / "long.parquet").num_rows == 123


def test_cli_errors_are_one_line_with_what_to_do(shared_data, tmp_path, run_entry_point):
    def run(*args):  # `python -m pipeline.datasets ARGS`'s entry point, in this process
        return run_entry_point(
            main, *args, "--data-dir", shared_data, "--output", tmp_path / "x.parquet"
        )

    unknown = run("cosqa", "--set", "pool=5")
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        "error: cosqa has no argument pool; its arguments are: pool_size, seed, answerable_only"
    )
    workload = run("dl19", "--qrels-output", str(tmp_path / "q.txt"))
    assert workload.returncode == 2 and "use a collection name" in workload.stderr
    assert not (tmp_path / "x.parquet").exists()
