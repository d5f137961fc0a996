"""The job's selection on Ray actors, one ranked bucket per task: the same bytes with 1 or 4 actors and with 1
or 4 ranking buckets, and the input read once (texts come from ranked/)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.hard_negatives import main
from pipeline import schema

FAST = ["--model", "dummy:tiny", "--dtype", "float32", "--set", "rerank.tokenizer.max_length=96",
        "--set", "selection.min_positive_label=2", "--set", "selection.sampling=random", "--set", "selection.seed=3",
        "--set", "output.rows_per_part=150"]


@pytest.fixture(scope="module")
def four_queries(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """4 DL19 queries with positives, 100 candidates each (400 pairs), and the NIST qrels."""
    from pipeline.datasets import trec_dl

    pairs, qrels = trec_dl(2019, shared_data)
    positive_queries = pc.unique(qrels.filter(pc.greater_equal(qrels[schema.LABEL], 2))[schema.QUERY_ID])
    chosen = pc.unique(pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=positive_queries))[schema.QUERY_ID])[:4]
    path = tmp_path_factory.mktemp("hn_distributed") / "input.parquet"
    pq.write_table(pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=chosen)), path, row_group_size=100)
    return path, shared_data / "trec-dl" / "qrels.dl19-passage.txt"


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "rerank"}


@pytest.mark.slow  # two rerank runs on a local Ray, and selection on actors
def test_same_bytes_with_any_number_of_actors_and_buckets(four_queries, tmp_path):
    source, qrels = four_queries
    args = ["--input", str(source), "--positives", str(qrels), *FAST]
    one = tmp_path / "one"
    assert main([*args, "--output", str(one), "--set", "workers.num_actors=1"]) == 0
    first = outputs(one)
    assert {name for name in first if name.startswith("candidates/")} == {
        f"candidates/part-{p:05d}.parquet" for p in range(3)}  # 400 rows, 150 per part
    assert not (one / "_work").exists()

    # The same output again with 4 actors: the scores are reused, the selection redone on more actors.
    assert main([*args, "--output", str(one), "--set", "workers.num_actors=4", "--set",
                 "workers.num_cpus=0.25"]) == 0
    assert outputs(one) == first

    # Five ranking buckets (a new rerank), the 4 queries hashed to 4 of them: one query per ranked part, selected
    # by two actors, and the same files.
    four = tmp_path / "four"
    assert main([*args, "--output", str(four), "--set", "rerank.output.rows_per_bucket=80",
                 "--set", "workers.num_actors=2"]) == 0
    assert len(list((four / "rerank" / "ranked").glob("part-*.parquet"))) == 4
    assert outputs(four) == first

    stats = json.loads((one / "stats.json").read_text())
    canonical = pq.read_table(one / "candidates")
    assert stats["rows"] == canonical.num_rows == 400 and stats["queries"]["in"] == 4
    assert stats["kept_negatives"] == pc.sum(canonical["keep"]).as_py() > 0
    # The texts in the training files are the input's, carried through ranked/.
    given = set(pq.read_table(source)[schema.DOCUMENT].to_pylist())
    triplets = pq.read_table(one / "triplet")
    assert triplets.num_rows == stats["projections"]["triplet_rows"] > 0
    assert set(triplets["negative"].to_pylist()) <= given
