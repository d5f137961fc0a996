"""The scoring phase's commit state machine, without Ray: reports in any order, repeated, windows late."""

from __future__ import annotations

import pytest

from pipeline.core.errors import PipelineError
from pipeline.rerank.commits import ShardCommits
from pipeline.rerank.stages.read import Shard


def report(
    shard: int,
    path: str,
    kind: str = "scored",
    pairs: int = 0,
    rows: int | None = None,
    tokens: int = 0,
    windows_expected: int | None = None,
) -> dict:
    rows = pairs if rows is None else rows
    return {
        "shard": shard,
        "kind": kind,
        "path": path,
        "bucket": 0 if kind == "scored" else -1,
        "pairs": pairs,
        "rows": rows,
        "tokens": tokens,
        "windows_expected": rows if windows_expected is None else windows_expected,
    }


def test_a_shard_commits_once_all_its_rows_are_reported_in_any_order():
    commits = ShardCommits(
        [Shard(0, "a.parquet", (0,), 10, 10, (10,)), Shard(1, "a.parquet", (1,), 5, 5, (5,))]
    )
    assert commits.add(report(1, "s1-a", pairs=3, tokens=30)) is None
    assert commits.add(report(0, "s0-rej", kind="rejected", pairs=2)) is None
    assert commits.add(report(0, "s0-a", pairs=8, tokens=80)) == {
        "shard": 0,
        "pairs": 8,
        "rejected": 2,
        "tokens": 80,
        "hits": 0,
        "same_texts": 0,
        "files": [
            report(0, "s0-rej", kind="rejected", pairs=2),
            report(0, "s0-a", pairs=8, tokens=80),
        ],
    }
    with pytest.raises(PipelineError, match="shard 1 finished with 3 of 5 rows"):
        commits.check_complete()
    manifest = commits.add(report(1, "s1-b", pairs=2, tokens=20))
    assert manifest["pairs"] == 5 and manifest["tokens"] == 50
    commits.check_complete()


def test_a_retried_report_counts_once_and_a_committed_shard_never_commits_again():
    commits = ShardCommits([Shard(0, "a.parquet", (0,), 4, 4, (4,))])
    assert commits.add(report(0, "same-file", pairs=2)) is None
    assert (
        commits.add(report(0, "same-file", pairs=2)) is None
    )  # a retried task rewrote the same file
    assert commits.add(report(0, "other", pairs=2))["pairs"] == 4
    assert commits.add(report(0, "late-duplicate-batch", pairs=2)) is None


def test_windows_that_arrive_late_hold_the_commit_back():
    # Two pairs with three windows each; the first report carries both pairs' first windows only.
    commits = ShardCommits([Shard(0, "a.parquet", (0,), 2, 2, (2,))])
    assert commits.add(report(0, "w0", pairs=2, rows=2, windows_expected=6)) is None
    assert commits.add(report(0, "w1", pairs=0, rows=3, windows_expected=0)) is None
    assert commits.add(report(0, "w2", pairs=0, rows=1, windows_expected=0))["pairs"] == 2


def test_score_cache_staging_is_listed_in_the_manifest_but_never_counted_as_rows():
    commits = ShardCommits([Shard(0, "a.parquet", (0,), 6, 6, (6,))])
    cache = {
        "shard": 0,
        "kind": "cache",
        "path": "cache-00003-x",
        "bucket": 3,
        "pairs": 0,
        "rows": 4,
        "tokens": 0,
        "windows_expected": 0,
        "hits": 0,
        "same_texts": 0,
    }
    waiting = dict(cache, kind="waiting", path="waiting-00001-y", bucket=1, rows=1)
    assert commits.add(cache) is None and commits.add(waiting) is None
    scored = dict(report(0, "b0", pairs=6, tokens=40), hits=1, same_texts=1)
    manifest = commits.add(scored)
    assert manifest["pairs"] == 6 and manifest["hits"] == 1 and manifest["same_texts"] == 1
    assert [f["kind"] for f in manifest["files"]] == ["cache", "waiting", "scored"]
