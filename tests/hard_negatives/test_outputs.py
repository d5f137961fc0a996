"""The written outputs on real DL19 data: read back, reconciled, byte-identical across runs, and the training
files checked against the canonical table they come from."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.core.storage import url_to_fs
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.io import read_run_metadata, write_outputs
from pipeline.hard_negatives.select import (
    DROP_REASON,
    DROP_REASONS,
    IS_POSITIVE,
    KEEP,
    select_negatives,
)
from pipeline.hard_negatives.stats import format_summary


def job_config(**selection) -> HardNegativesConfig:
    return HardNegativesConfig.model_validate(
        {
            "selection": {"min_positive_label": 2, "num_negatives": 4, **selection},
            "projections": {"scores": "margin"},
        }
    )


def run(dl19, output: str, config: HardNegativesConfig) -> dict:
    candidates, qrels = dl19
    canonical = select_negatives(candidates, config.selection, qrels)
    info = {"model": "bm25-test-scorer", "revision": None, "seed": config.selection.seed}
    return write_outputs(output, canonical, candidates, config, info, qrels)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_stats_reconcile_with_the_canonical_table(dl19, tmp_path):
    config = job_config()
    stats = run(dl19, str(tmp_path), config)
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    table = pq.read_table(tmp_path / "candidates")
    rows = table.to_pylist()
    assert stats["rows"] == len(rows) == dl19[0].num_rows
    assert stats["kept_negatives"] == sum(r[KEEP] for r in rows)
    assert stats["positives"] == sum(r[IS_POSITIVE] for r in rows)
    assert stats["drop_reasons"] == {
        reason: sum(r[DROP_REASON] == reason for r in rows) for reason in DROP_REASONS
    }
    assert stats["kept_negatives"] + sum(stats["drop_reasons"].values()) == stats["rows"]
    kept = collections.Counter(r[schema.QUERY_ID] for r in rows if r[KEEP])
    positives = collections.Counter(r[schema.QUERY_ID] for r in rows if r[IS_POSITIVE])
    queries = {r[schema.QUERY_ID] for r in rows}
    q = stats["queries"]
    assert q["in"] == len(queries) == 43
    assert q["with_positive"] == len(positives)
    assert q["skipped_no_positive"] == len(queries - set(positives))
    assert q["with_full_quota"] == sum(kept[x] >= 4 for x in positives)
    assert q["short"] == sum(kept[x] < 4 for x in positives) and q["with_full_quota"] + q[
        "short"
    ] == len(positives)
    assert sum(stats["negatives_per_query"].values()) == len(positives)
    scores = np.array([r[schema.SCORE] for r in rows if r[KEEP]], dtype=np.float64)
    assert stats["scores"]["kept_negatives"]["count"] == len(scores)
    assert stats["scores"]["kept_negatives"]["mean"] == pytest.approx(scores.mean(), abs=1e-6)
    assert read_run_metadata(table.schema)["model"] == "bm25-test-scorer"
    summary = format_summary(stats)
    assert f"queries in: {q['in']}" in summary and f"{stats['drop_reasons']['margin']:,}" in summary
    # The model is named first; random weights are said loudly, trained ones are not.
    assert summary.splitlines()[0] == "model: bm25-test-scorer" and "RANDOM WEIGHTS" not in summary
    random = format_summary(
        {**stats, "run": {**stats["run"], "model": "dummy:tiny", "random_weights": True}}
    )
    assert random.splitlines()[1].startswith("RANDOM WEIGHTS: dummy:tiny has random weights")


def test_training_files_hold_positives_and_kept_negatives_only(dl19, tmp_path):
    candidates, _ = dl19
    config = job_config()
    stats = run(dl19, str(tmp_path), config)
    rows = pq.read_table(tmp_path / "candidates").to_pylist()
    text = {
        (r[schema.QUERY_ID], r[schema.DOC_ID]): r[schema.DOCUMENT] for r in candidates.to_pylist()
    }
    query_text = dict(
        zip(candidates[schema.QUERY_ID].to_pylist(), candidates[schema.QUERY].to_pylist())
    )
    positives, negatives = collections.defaultdict(dict), collections.defaultdict(dict)
    for r in rows:
        if r[IS_POSITIVE] or r[KEEP]:
            target = positives if r[IS_POSITIVE] else negatives
            target[query_text[r[schema.QUERY_ID]]][text[(r[schema.QUERY_ID], r[schema.DOC_ID])]] = (
                r[schema.SCORE]
            )

    triplets = pq.read_table(tmp_path / "triplet").to_pylist()
    assert (
        len(triplets)
        == stats["projections"]["triplet_rows"]
        == sum(len(positives[q]) * len(negatives[q]) for q in positives)
    )
    for t in triplets:
        pos, neg = positives[t["query"]][t["positive"]], negatives[t["query"]][t["negative"]]
        assert t["label"] == pytest.approx(pos - neg) and t["label"] >= 0  # the margin rule held

    tuples = pq.read_table(tmp_path / "n-tuple").to_pylist()
    assert (
        len(tuples)
        == stats["projections"]["n_tuple_rows"]
        == sum(len(positives[q]) for q in positives if len(negatives[q]) >= 4)
    )
    for t in tuples:
        negs = [t[f"negative_{i}"] for i in range(1, 5)]
        assert sorted(negs, key=lambda n: -negatives[t["query"]][n]) == negs  # hardest first
        assert t["label"] == pytest.approx(
            [positives[t["query"]][t["positive"]] - negatives[t["query"]][n] for n in negs]
        )

    lines = [
        json.loads(line)
        for line in (tmp_path / "flagembedding" / "train.jsonl").read_text().splitlines()
    ]
    assert (
        len(lines)
        == stats["projections"]["flagembedding_lines"]
        == sum(1 for q in positives if negatives[q])
    )
    for line in lines:
        assert dict(zip(line["pos"], line["pos_scores"])) == pytest.approx(positives[line["query"]])
        assert dict(zip(line["neg"], line["neg_scores"])) == pytest.approx(negatives[line["query"]])


def test_same_seed_same_bytes_other_seed_other_sample(dl19, tmp_path):
    config = job_config(sampling="random", seed=3)
    run(dl19, str(tmp_path / "a"), config)
    run(dl19, str(tmp_path / "b"), config)
    run(dl19, str(tmp_path / "c"), job_config(sampling="random", seed=4))
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert set(a) == {
        "candidates/part-00000.parquet",
        "triplet/part-00000.parquet",
        "n-tuple/part-00000.parquet",
        "flagembedding/train.jsonl",
        "stats.json",
    }
    assert a == b
    assert a["triplet/part-00000.parquet"] != c["triplet/part-00000.parquet"]
    first, other = (
        pq.read_table(tmp_path / "a" / "candidates"),
        pq.read_table(tmp_path / "c" / "candidates"),
    )
    assert first.drop_columns([KEEP, DROP_REASON]).equals(other.drop_columns([KEEP, DROP_REASON]))


def test_per_positive_projections_deal_each_positive_its_own_negatives(dl19, tmp_path):
    config = HardNegativesConfig.model_validate(
        {
            "selection": {
                "min_positive_label": 2,
                "num_negatives": 2,
                "negatives_per": "positive",
                "relative_margin": None,
            },
            "projections": {"formats": ["triplet", "n-tuple"]},
        }
    )
    stats = run(dl19, str(tmp_path), config)
    triplets = pq.read_table(tmp_path / "triplet").to_pylist()
    by_positive = collections.defaultdict(list)
    for t in triplets:
        by_positive[(t["query"], t["positive"])].append(t["negative"])
    assert by_positive and all(len(n) <= 2 for n in by_positive.values())
    negatives_of_query = collections.defaultdict(list)
    for (query, _), negs in by_positive.items():
        negatives_of_query[query] += negs
    assert all(
        len(n) == len(set(n)) for n in negatives_of_query.values()
    )  # no negative dealt twice
    assert len(triplets) == stats["kept_negatives"]
    assert not (tmp_path / "flagembedding").exists()


def test_outputs_on_s3(dl19, s3_bucket):
    bucket, options = s3_bucket
    config = job_config().model_copy(update={"storage_options": options})
    stats = run(dl19, f"{bucket}/mined", config)
    fs, root = url_to_fs(f"{bucket}/mined", options)
    assert json.loads(fs.cat(f"{root}/stats.json")) == json.loads(json.dumps(stats))
    table = pq.read_table(f"{root}/candidates", filesystem=fs)
    assert (
        table.num_rows == stats["rows"] and sum(table[KEEP].to_pylist()) == stats["kept_negatives"]
    )
