"""The job's selection on Ray actors, one ranked bucket per task: the same bytes with 1 or 4 actors and with 1
or 4 ranking buckets, and the input read once (texts come from ranked/)."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.hard_negatives import main
from pipeline.core import schema
from tests.hard_negatives.conftest import hn_outputs

FAST = [
    "--model",
    "dummy:tiny",
    "--dtype",
    "float32",
    "--set",
    "rerank.tokenizer.max_length=96",
    "--set",
    "selection.min_positive_label=2",
    "--set",
    "selection.sampling=random",
    "--set",
    "selection.seed=3",
    "--set",
    "output.rows_per_part=150",
]


@pytest.mark.slow  # two rerank runs on a local Ray, and selection on actors
def test_same_bytes_with_any_number_of_actors_and_buckets(four_queries, tmp_path):
    source, qrels = four_queries
    args = ["--input", str(source), "--positives", str(qrels), *FAST]
    one = tmp_path / "one"
    assert main([*args, "--output", str(one), "--set", "workers.num_actors=1"]) == 0
    first = hn_outputs(one)
    assert {name for name in first if name.startswith("candidates/")} == {
        f"candidates/part-{p:05d}.parquet" for p in range(3)
    }  # 400 rows, 150 per part
    assert not (one / "_work").exists()

    # The same output again with 4 actors: the scores are reused, the selection redone on more actors.
    assert (
        main(
            [
                *args,
                "--output",
                str(one),
                "--set",
                "workers.num_actors=4",
                "--set",
                "workers.num_cpus=0.25",
            ]
        )
        == 0
    )
    assert hn_outputs(one) == first

    # Five ranking buckets (a new rerank), the 4 queries hashed to 4 of them: one query per ranked part, selected
    # by two actors, and the same files.
    four = tmp_path / "four"
    assert (
        main(
            [
                *args,
                "--output",
                str(four),
                "--set",
                "rerank.output.rows_per_bucket=80",
                "--set",
                "workers.num_actors=2",
            ]
        )
        == 0
    )
    assert len(list((four / "rerank" / "ranked").glob("part-*.parquet"))) == 4
    assert hn_outputs(four) == first

    stats = json.loads((one / "stats.json").read_text())
    canonical = pq.read_table(one / "candidates")
    assert stats["rows"] == canonical.num_rows == 400 and stats["queries"]["in"] == 4
    assert stats["kept_negatives"] == pc.sum(canonical["keep"]).as_py() > 0
    # The texts in the training files are the input's, carried through ranked/.
    given = set(pq.read_table(source)[schema.DOCUMENT].to_pylist())
    triplets = pq.read_table(one / "triplet")
    assert triplets.num_rows == stats["projections"]["triplet_rows"] > 0
    assert set(triplets["negative"].to_pylist()) <= given
