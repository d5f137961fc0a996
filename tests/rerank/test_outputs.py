"""Outputs that explain themselves: every file says what produced it; rejected/ exists even when empty."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import load_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank

pytestmark = pytest.mark.slow


def test_every_output_file_names_its_model_and_rejected_is_always_there(
    ray_local, dl19_rows, tmp_path
):
    clean, dirty = tmp_path / "clean.parquet", tmp_path / "dirty.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:40]), clean)
    rows = [dict(r) for r in dl19_rows[:40]]
    rows[3]["query"] = ""
    rows.append(dict(rows[5]))  # a duplicate pair
    pq.write_table(pa.Table.from_pylist(rows), dirty)
    config = load_config(RerankConfig, None, [], model="dummy:tiny")

    summary = run_rerank(config, str(clean), str(tmp_path / "out-clean"))
    empty = pq.read_table(tmp_path / "out-clean" / "rejected" / "part-empty.parquet")
    assert (
        empty.num_rows == 0 and "reason" in empty.column_names and "document" in empty.column_names
    )

    run_rerank(config, str(dirty), str(tmp_path / "out-dirty"))
    files = [
        *(tmp_path / "out-clean").glob("*/*.parquet"),
        *(tmp_path / "out-dirty").glob("*/*.parquet"),
    ]
    assert {f.parent.name for f in files} == {"ranked", "rejected"}
    assert not list(
        (tmp_path / "out-dirty" / "rejected").glob("part-empty.parquet")
    )  # only when nothing else
    assert len([f for f in files if "duplicates" in f.name]) == 1
    for f in files:
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(f).metadata or {}).items()}
        assert meta["rerank.model"] == "dummy:tiny", f
        assert meta["rerank.random_weights"] == "true"
        assert meta["rerank.config_hash"] == summary["config_hash"]
        assert meta["rerank.dtype"] == ",".join(summary["dtype"])
        assert meta["rerank.job_version"] and meta["rerank.revision"] == summary["revision"]
    dirty_summary = json.loads((tmp_path / "out-dirty" / "summary.json").read_text())
    rejected = pa.concat_tables(
        [pq.read_table(f) for f in (tmp_path / "out-dirty" / "rejected").glob("*.parquet")]
    )
    assert rejected.num_rows == dirty_summary["rejected_rows"] == 2
    assert sorted(rejected.column("reason").to_pylist())[0].startswith("duplicate")
