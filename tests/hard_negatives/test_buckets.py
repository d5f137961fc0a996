"""Selection per ranking bucket and output parts merged by query (the job's distributed stages, run here as
plain classes on real DL19 candidates): the same bytes whatever the number of buckets, and the same rows
and stats as selecting on the whole table at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.hard_negatives.buckets import SelectBucket, WritePart, projection_counts
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.io import read_run_metadata
from pipeline.hard_negatives.select import select_negatives
from pipeline.hard_negatives.stats import compute_stats, reduce_stats
from pipeline.rerank.stages.write import bucket_of

RUN = {"model": "bm25-test-scorer", "seed": 7}


def job_config(**output) -> HardNegativesConfig:
    return HardNegativesConfig.model_validate(
        {
            "selection": {
                "min_positive_label": 2,
                "num_negatives": 4,
                "sampling": "random",
                "seed": 7,
            },
            "projections": {"scores": "margin"},
            "output": output,
        }
    )


def run_in_buckets(
    dl19, root: Path, num_buckets: int, num_parts: int, config: HardNegativesConfig
) -> list[dict]:
    """The ranked table cut into buckets by hash(query_id) as the rerank job cuts it, rows shuffled within each
    (a bucket's row order is the rerank's business), then both stages. Returns the stats pieces."""
    candidates, qrels = dl19
    buckets = bucket_of(candidates[schema.QUERY_ID].combine_chunks(), num_buckets)
    items = []
    for b in range(num_buckets):
        rows = candidates.filter(pa.array(buckets == b))
        rows = rows.take(np.random.default_rng(b).permutation(rows.num_rows))
        path = root / "ranked" / f"part-{b:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path)
        items.append({"bucket": b, "uri": str(path)})
    work, out = str(root / "_work"), str(root / "out")
    select = SelectBucket(config, qrels, work, num_parts)
    pieces = [
        json.loads(p)
        for item in items
        for p in select(pa.Table.from_pylist([item]))["piece"].to_pylist()
    ]
    write = WritePart(config, work, out, num_parts, RUN)
    for part in range(num_parts):
        write(pa.table({"part": [part]}))
    return pieces


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("num_parts", [1, 3])
def test_output_bytes_do_not_depend_on_the_number_of_buckets(dl19, tmp_path, num_parts):
    config = job_config()
    one = run_in_buckets(dl19, tmp_path / "one", 1, num_parts, config)
    five = run_in_buckets(dl19, tmp_path / "five", 5, num_parts, config)
    a, b = files(tmp_path / "one" / "out"), files(tmp_path / "five" / "out")
    assert a == b
    names = {"candidates", "triplet", "n-tuple"}
    expected = {f"{n}/part-{p:05d}.parquet" for n in names for p in range(num_parts)}
    expected |= (
        {"flagembedding/train.jsonl"}
        if num_parts == 1
        else {f"flagembedding/train-{p:05d}.jsonl" for p in range(num_parts)}
    )
    assert set(a) == expected
    assert reduce_stats(one, config.selection, dl19[1]) == reduce_stats(
        five, config.selection, dl19[1]
    )


def test_parts_hold_what_selecting_the_whole_table_gives(dl19, tmp_path):
    candidates, qrels = dl19
    config = job_config()
    pieces = run_in_buckets(dl19, tmp_path, 4, 3, config)
    whole = select_negatives(candidates, config.selection, qrels)
    parts = [pq.read_table(p) for p in sorted((tmp_path / "out" / "candidates").glob("*.parquet"))]
    assert all(read_run_metadata(p.schema) == RUN for p in parts)
    key = [
        (schema.QUERY_ID, "ascending"),
        (schema.SCORE, "descending"),
        (schema.DOC_ID, "ascending"),
    ]
    merged = pa.concat_tables(parts).replace_schema_metadata(None).sort_by(key)
    assert merged.equals(whole)
    for part in parts:  # each part in the canonical order, and no query in two parts
        assert part.replace_schema_metadata(None).equals(
            part.replace_schema_metadata(None).sort_by(key)
        )
    ids = [set(p[schema.QUERY_ID].to_pylist()) for p in parts]
    assert sum(len(i) for i in ids) == len(set().union(*ids)) == 43

    stats = reduce_stats(pieces, config.selection, qrels)
    reference = compute_stats(whole, config.selection, qrels)
    assert stats == reference
    counts = {
        name: sum(p["projections"][name] for p in pieces) for name in projection_counts([], config)
    }
    assert (
        counts["triplet_rows"]
        == sum(pq.read_table(p).num_rows for p in (tmp_path / "out" / "triplet").glob("*.parquet"))
        > 0
    )
    lines = [
        line
        for p in sorted((tmp_path / "out" / "flagembedding").glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    assert len(lines) == counts["flagembedding_lines"] > 0
    assert len({json.loads(line)["query"] for line in lines}) == len(lines)  # one line per query
