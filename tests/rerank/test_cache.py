"""The score cache: a warm run scores nothing and writes the same bytes; a changed input scores exactly the
changed pairs; another model, dtype or max_length never hits; a repeated pair is scored once; a killed run
leaves nothing in the cache; two jobs append to one cache at once; maintenance keeps it readable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rerank import main as rerank_main
from pipeline.core.config import load_config
from pipeline.rerank import cache as C
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank
from tests.rerank.conftest import ROOT, read_dir

JOB = ["jobs.rerank"]


def _config(cache_uri, *overrides, model="dummy:tiny", storage_options=None) -> RerankConfig:
    config = load_config(
        RerankConfig,
        None,
        [f"cache.uri={cache_uri}", "cache.buckets=4", "input.rows_per_shard=300", *overrides],
        model=model,
    )
    return (
        config.model_copy(update={"storage_options": storage_options})
        if storage_options
        else config
    )


def _rows(dl19_rows, n) -> list[dict]:
    return [{k: r[k] for k in ("query_id", "query", "doc_id", "document")} for r in dl19_rows[:n]]


def _write(rows, path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=150)
    return str(path)


def _entries(cache_dir) -> int:
    files = list(Path(cache_dir).glob("*/bucket-*/part-*.parquet"))
    if not files:
        return 0
    keys = pa.concat_tables([pq.read_table(f) for f in files]).column(C.KEY)
    return len(pa.compute.unique(keys))


def _same_ranking(a: pa.Table, b: pa.Table) -> None:
    """Same pairs, scores equal within float32 noise of batch composition, and the same ranks wherever a
    score stands clear of its query's others (near-ties may order either way)."""
    a = a.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    b = b.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    assert a.column("query_id").equals(b.column("query_id")) and a.column("doc_id").equals(
        b.column("doc_id")
    )
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-5)
    qid = a.column("query_id").to_numpy()
    ra, rb = a.column("rank").to_numpy(), b.column("rank").to_numpy()
    for q in np.unique(qid):
        s = sa[qid == q]
        gaps = np.abs(s[:, None] - s[None, :]) + np.eye(len(s))
        clear = gaps.min(axis=1) > 1e-4
        assert (ra[qid == q][clear] == rb[qid == q][clear]).all()


@pytest.mark.slow
def test_warm_run_scores_nothing_and_a_changed_input_scores_exactly_what_changed(
    ray_local, dl19_rows, tmp_path
):
    cache = tmp_path / "cache"
    rows = _rows(dl19_rows, 300)
    original = _write(rows, tmp_path / "day1.parquet")
    two_shards = "input.rows_per_shard=150"
    cold = run_rerank(_config(cache, two_shards), original, str(tmp_path / "cold"))
    assert (
        cold["pairs_scored"] == 300
        and cold["cache_hits"] == 0
        and cold["cache"]["entries_added"] == 300
        and cold["shards"] == 2
    )
    assert _entries(cache) == 300
    warm = run_rerank(_config(cache, two_shards), original, str(tmp_path / "warm"))
    assert (
        warm["pairs_scored"] == 0
        and warm["cache_hits"] == 300
        and warm["cache"]["entries_added"] == 0
    )
    for part in (tmp_path / "cold" / "ranked").glob("*.parquet"):
        assert part.read_bytes() == (tmp_path / "warm" / "ranked" / part.name).read_bytes()
    assert warm["scorer_seconds_saved"] is None or warm["scorer_seconds_saved"] > 0

    # Day 2: 10% of the documents rewritten (ids kept: ids are reused with new text), 5% new pairs.
    changed = [dict(r) for r in rows]
    for r in changed[::10]:
        r["document"] = r["document"] + " (updated)"
    new = [
        dict(
            r,
            query_id=r["query_id"],
            doc_id=f"new-{i}",
            document=f"A new passage {i}: " + r["document"][:200],
        )
        for i, r in enumerate(rows[:15])
    ]
    day2 = _write(changed + new, tmp_path / "day2.parquet")
    incremental = run_rerank(_config(cache, two_shards), day2, str(tmp_path / "incremental"))
    assert incremental["pairs_scored"] == 30 + 15
    assert incremental["cache_hits"] == 300 - 30
    fresh = run_rerank(_config(tmp_path / "other-cache", two_shards), day2, str(tmp_path / "fresh"))
    assert fresh["pairs_scored"] == 315
    _same_ranking(
        read_dir(tmp_path / "incremental" / "ranked"), read_dir(tmp_path / "fresh" / "ranked")
    )


@pytest.fixture(scope="module")
def float32_then_int8(ray_local, dl19_rows, tmp_path_factory) -> dict:
    """20 pairs scored into one cache in float32, then in int8 with the default int8 options: the int8 run is
    both a setting that must miss the float32 entries and the default that other int8 options are compared
    with. oneDNN's int8 Linear is slow on CPUs without VNNI (20 pairs: seconds), so the two tests share it.

    {"dir": the folder holding `cache/`, `base/` and `int8/` (the runs' outputs), "input": the input's path,
    "base", "int8": the runs' summaries}; a test copies `cache/` before it adds to it."""
    root = tmp_path_factory.mktemp("float32-then-int8")
    path = _write(_rows(dl19_rows, 20), root / "in.parquet")
    base = run_rerank(_config(root / "cache", "dtype=float32"), path, str(root / "base"))
    int8 = run_rerank(_config(root / "cache", "dtype=int8"), path, str(root / "int8"))
    return {"dir": root, "input": path, "base": base, "int8": int8}


@pytest.mark.slow
def test_another_model_dtype_or_max_length_misses_everything(float32_then_int8, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(float32_then_int8["dir"] / "cache", cache)
    path, base = float32_then_int8["input"], float32_then_int8["base"]
    assert base["pairs_scored"] == 20
    # int8 ran on the float32 entries, in the fixture.
    int8 = float32_then_int8["int8"]
    assert int8["cache_hits"] == 0 and int8["pairs_scored"] == 20, "int8"
    assert int8["cache"]["fingerprint"] != base["cache"]["fingerprint"], "int8"
    from pipeline.model.dummy import dummy_checkpoint

    other_weights = dummy_checkpoint(
        "tiny", cache_dir=str(tmp_path / "models"), seed=7
    )  # same shape and tokenizer
    for name, overrides, model in [
        ("dtype", ["dtype=bfloat16"], "dummy:tiny"),
        ("max_length", ["dtype=float32", "tokenizer.max_length=64"], "dummy:tiny"),
        ("weights", ["dtype=float32"], other_weights),
    ]:
        other = run_rerank(_config(cache, *overrides, model=model), path, str(tmp_path / name))
        assert other["cache_hits"] == 0 and other["pairs_scored"] == 20, name
        assert other["cache"]["fingerprint"] != base["cache"]["fingerprint"], name
    assert len(list(cache.glob("*/_cache.json"))) == 5
    # int8 scores depend on the weights' range the scorer's CPU allows (7 bits without VNNI): it is in the
    # fingerprint, so CPUs of both kinds sharing a cache never mix their scores.
    from pipeline.model.quantization import weight_qmax

    int8 = [json.loads(p.read_text()) for p in cache.glob("*/_cache.json")]
    int8 = [
        c["covers"]["settings"]["int8"] for c in int8 if c["covers"]["settings"]["dtype"] == "int8"
    ]
    assert (
        len(int8) == 1
        and int8[0]["weight_qmax"] == weight_qmax()
        and int8[0]["smooth_alpha"] == 0.5
    )


@pytest.mark.slow
def test_int8_options_reach_the_scorers_and_never_share_entries(float32_then_int8, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(float32_then_int8["dir"] / "cache", cache)
    path, default = float32_then_int8["input"], float32_then_int8["int8"]
    tuned = run_rerank(
        _config(cache, "dtype=int8", 'int8.fp32_layers=["layers.0.*"]'),
        path,
        str(tmp_path / "tuned"),
    )
    assert default["pairs_scored"] == 20 and default["dtype"] == ["int8"]
    assert tuned["pairs_scored"] == 20 and tuned["cache_hits"] == 0 and tuned["dtype"] == ["int8"]
    assert tuned["cache"]["fingerprint"] != default["cache"]["fingerprint"]
    assert tuned["config"]["int8"] == {"smooth_alpha": 0.5, "fp32_layers": ["layers.0.*"]}
    assert (
        tuned["config_hash"] != default["config_hash"]
    )  # an output of one never resumes as the other
    # The cache records the layers the pattern picked, as the scorers resolve it.
    covers = [json.loads(p.read_text())["covers"]["settings"] for p in cache.glob("*/_cache.json")]
    assert len(covers) == 3  # float32, int8, int8 with layer 0 in float32
    int8 = sorted(
        (c["int8"] for c in covers if c["dtype"] == "int8"), key=lambda s: len(s["fp32_layers"])
    )
    assert [s["fp32_layers"] for s in int8] == [
        [],
        ["layers.0.mixer.Wqkv", "layers.0.mixer.out_proj", "layers.0.mlp.fc1", "layers.0.mlp.fc2"],
    ]
    assert [s["smooth_alpha"] for s in int8] == [0.5, 0.5]
    # The scorers ran the options: layer 0 in float32 moves every score a little (int8 rounding, not the ranking).
    a = read_dir(float32_then_int8["dir"] / "int8" / "ranked")
    b = read_dir(tmp_path / "tuned" / "ranked")
    score = lambda t: {(r["query_id"], r["doc_id"]): r["score"] for r in t.to_pylist()}  # noqa: E731
    sa, sb = score(a), score(b)
    assert sa.keys() == sb.keys() and len(sa) == 20
    diff = np.abs(np.array([sa[k] for k in sa]) - np.array([sb[k] for k in sa]))
    assert diff.max() > 1e-3 and (diff > 1e-6).sum() >= 10  # half the pairs or more


@pytest.mark.slow
def test_a_pair_repeated_in_one_input_is_scored_once(ray_local, dl19_rows, tmp_path):
    rows = _rows(dl19_rows, 200)
    # The same texts under other query ids (a popular query logged twice), and an exact repeat of a row.
    twins = [dict(r, query_id=r["query_id"] + 10_000_000) for r in rows[:50]]
    path = _write(rows + twins + [dict(rows[7])], tmp_path / "in.parquet")
    summary = run_rerank(
        _config(
            tmp_path / "cache",
            "tokenizer.long_documents=windows",
            "tokenizer.max_length=64",
            "tokenizer.max_query_length=24",
        ),
        path,
        str(tmp_path / "out"),
    )
    assert summary["pairs_scored"] == 200 and summary["cache_same_texts"] == 51
    assert (
        summary["scored_rows"] == 250 and summary["rejected_rows"] == 1
    )  # the exact repeat: a duplicate pair
    ranked = read_dir(tmp_path / "out" / "ranked").to_pylist()
    score = {(r["query_id"], r["doc_id"]): r["score"] for r in ranked}
    for twin in twins:
        assert (
            score[(twin["query_id"], twin["doc_id"])]
            == score[(twin["query_id"] - 10_000_000, twin["doc_id"])]
        )


@pytest.mark.slow
def test_a_killed_run_leaves_no_entry_and_the_rerun_is_exact(
    ray_local, dl19_rows, tmp_path, run_entry_point
):
    cache, output = tmp_path / "cache", tmp_path / "out"
    pq.write_table(
        pa.Table.from_pylist(_rows(dl19_rows, 500)), tmp_path / "in.parquet", row_group_size=125
    )
    dl19_long = tmp_path / "in.parquet"
    common = [
        "--model",
        "dummy:tiny",
        "--set",
        f"cache.uri={cache}",
        "--set",
        "input.rows_per_shard=125",
        "--set",
        "io.rows_per_write=100",
        "--set",
        "scorer.batch_size=100",
        "--set",
        "tokenizer.max_length=64",  # what is tested is which pairs are scored, not their scores
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", *JOB, "--input", str(dl19_long), "--output", str(output), *common],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(
            (output / "_work" / "manifests").glob("shard-*.json")
        ):
            time.sleep(0.05)
        assert list((output / "_work" / "manifests").glob("shard-*.json")), (
            "the run never committed a shard"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Committed shards' scores wait in the output's staging; nothing reached the cache.
    assert _entries(cache) == 0
    # Only the killed run needed a process of its own: the rerun runs on the session's Ray.
    result = run_entry_point(
        rerank_main, "--input", str(dl19_long), "--output", str(output), *common
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    ranked = read_dir(output / "ranked")
    assert (
        summary["shards_resumed"] >= 1 and summary["scored_rows"] + summary["rejected_rows"] == 500
    )
    assert ranked.num_rows == summary["scored_rows"]
    assert _entries(cache) == summary["scored_rows"] - summary["cache_same_texts"]


@pytest.mark.slow
def test_two_jobs_append_to_one_cache_at_once_then_compaction(dl19_rows, tmp_path, run_entry_point):
    cache = tmp_path / "cache"
    rows = _rows(dl19_rows, 300)
    a = _write(rows[:200], tmp_path / "a.parquet")
    b = _write(rows[100:], tmp_path / "b.parquet")  # 100 pairs in common
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--model", "dummy:tiny", "--set", f"cache.uri={cache}", "--set", "cache.buckets=4"]
    args += ["--set", "tokenizer.max_length=64"]  # which pairs are scored matters, not their scores
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *JOB, "--input", src, "--output", str(tmp_path / name), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src, name in ((a, "out-a"), (b, "out-b"))
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for name in ("out-a", "out-b"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["scored_rows"] == 200 == read_dir(tmp_path / name / "ranked").num_rows
    assert _entries(cache) == 300
    before = len(list(cache.glob("*/bucket-*/*.parquet")))
    result = run_entry_point(
        __import__("jobs.cache", fromlist=["main"]).main, "compact", "--cache", cache
    )
    assert result.returncode == 0, result.stderr
    assert len(list(cache.glob("*/bucket-*/*.parquet"))) <= 4 < before
    assert _entries(cache) == 300
    stats = json.loads(
        run_entry_point(
            __import__("jobs.cache", fromlist=["main"]).main, "stats", "--cache", cache
        ).stdout
    )
    assert (
        stats[0]["entries"] == 300
        and stats[0]["files"] <= 4
        and stats[0]["bytes_per_million_entries"] > 0
    )


@pytest.mark.slow
def test_the_cache_on_object_storage(ray_local, dl19_rows, tmp_path, s3_bucket):
    uri, options = s3_bucket
    path = _write(_rows(dl19_rows, 120), tmp_path / "in.parquet")
    cold = run_rerank(_config(f"{uri}/cache", storage_options=options), path, f"{uri}/cold")
    warm = run_rerank(_config(f"{uri}/cache", storage_options=options), path, f"{uri}/warm")
    assert cold["pairs_scored"] == 120 and warm["pairs_scored"] == 0 and warm["cache_hits"] == 120


# -- the cache's files, without Ray ------------------------------------------------------------------------


def _keys(n: int, seed: int = 0) -> pa.Array:
    rng = np.random.default_rng(seed)
    return pa.array([rng.bytes(16) for _ in range(n)], C.KEY_TYPE)


def _publish_all(root, keys: pa.Array, scores: np.ndarray, buckets: int, now=None) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    which = C.bucket_of_keys(keys, buckets)
    for b in range(buckets):
        mask = which == b
        C.publish(
            fs,
            str(root),
            b,
            pa.table(
                {C.KEY: keys.filter(pa.array(mask)), C.SCORE: pa.array(scores[mask], pa.float32())}
            ),
            now=now,
        )


def test_keys_depend_on_both_texts_and_the_fingerprint():
    fp1, fp2 = "0" * 32, "1" * 32
    k = C.pair_keys(fp1, ["ab", "a", "q", None], ["c", "bc", "d", "d"]).to_pylist()
    assert (
        k[0] != k[1] and k[3] is None
    )  # the query's length separates ("ab", "c") from ("a", "bc")
    assert C.pair_keys(fp2, ["q"], ["d"]).to_pylist()[0] != k[2]
    assert C.pair_keys(fp1, ["q"], ["d"]).to_pylist()[0] == k[2]
    buckets = C.bucket_of_keys(_keys(4000), 8)
    assert set(np.unique(buckets)) == set(range(8)) and np.bincount(buckets).min() > 350


def test_publishing_twice_adds_nothing_and_readers_keep_one_value_per_key(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    keys, scores = _keys(100), np.arange(100, dtype=np.float32)
    _publish_all(tmp_path, keys, scores, 2)
    files = sorted(tmp_path.glob("bucket-*/part-*.parquet"))
    _publish_all(tmp_path, keys, scores, 2)
    assert (
        sorted(tmp_path.glob("bucket-*/part-*.parquet")) == files
    )  # the same entries: the same file, skipped
    # Another job scored some of the same keys at once (float noise): readers all take the smaller.
    _publish_all(tmp_path, keys.slice(0, 10), scores[:10] + 0.5, 2)
    merged = pa.concat_tables([C.read_bucket(fs, str(tmp_path), b) for b in range(2)])
    assert merged.num_rows == 100
    assert dict(zip(merged.column(C.KEY).to_pylist(), merged.column(C.SCORE).to_pylist())) == dict(
        zip(keys.to_pylist(), scores.tolist())
    )


def test_compaction_merges_and_prune_drops_what_nobody_used(tmp_path, run_entry_point):
    import fsspec

    from jobs.cache import main

    fs = fsspec.filesystem("file")
    spec = C.open_cache(str(tmp_path), {}, "f" * 32, {"test": True}, 2)
    root = spec.uri
    old = datetime.now(timezone.utc) - timedelta(days=40)
    keys = _keys(300)
    _publish_all(
        root, keys.slice(0, 100), np.zeros(100, np.float32), 2, now=old
    )  # old, never found again
    _publish_all(
        root, keys.slice(100, 100), np.ones(100, np.float32), 2, now=old
    )  # old, found last week
    _publish_all(root, keys.slice(200, 100), np.full(100, 2, np.float32), 2)  # new
    found = keys.slice(100, 100)
    which = C.bucket_of_keys(found, 2)
    for b in range(2):
        C.record_hits(
            fs,
            root,
            b,
            found.filter(pa.array(which == b)),
            now=datetime.now(timezone.utc) - timedelta(days=7),
        )
    result = run_entry_point(main, "compact", "--cache", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(Path(root).glob("bucket-*/*.parquet"))) == 2
    assert sum(C.read_bucket(fs, root, b).num_rows for b in range(2)) == 300
    result = run_entry_point(main, "prune", "--cache", tmp_path, "--older-than", "30d")
    assert result.returncode == 0 and json.loads(result.stdout)[0]["dropped"] == 100
    left = pa.concat_tables([C.read_bucket(fs, root, b) for b in range(2)])
    assert sorted(left.column(C.KEY).to_pylist()) == sorted(keys.slice(100, 200).to_pylist())


def test_a_reader_lists_again_when_a_compaction_removed_its_file(tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("file")
    _publish_all(tmp_path, _keys(50), np.zeros(50, np.float32), 1)
    _publish_all(tmp_path, _keys(50, seed=1), np.ones(50, np.float32), 1)
    real_list, calls = C.list_bucket, []

    def list_then_compact(fs_, root, bucket, kind="part"):
        listed = real_list(fs_, root, bucket, kind)
        if (
            not calls
        ):  # the first listing goes stale: a compaction merges and removes the files it named
            calls.append(1)
            C.compact_bucket(fs_, root, bucket)
        return listed

    monkeypatch.setattr(C, "list_bucket", list_then_compact)
    assert C.read_bucket(fs, str(tmp_path), 0).num_rows == 100


def test_cache_command_errors_are_one_line(tmp_path, run_entry_point):
    from jobs.cache import main

    for argv, expected in [
        (["stats", "--cache", tmp_path], "no score cache under"),
        (["prune", "--cache", tmp_path], "prune needs --older-than"),
        (["prune", "--cache", tmp_path, "--older-than", "soon"], "write a number and a unit"),
        (["compact", "--cache", tmp_path, "--older-than", "3d"], "belongs to prune"),
    ]:
        result = run_entry_point(main, *argv)
        assert (
            result.returncode == 2
            and result.stderr.startswith("error: ")
            and expected in result.stderr
        ), argv
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_unusable_cache_or_windows_setting_is_one_line_before_any_work(
    tmp_path, dl19_rows, run_entry_point
):
    from jobs.rerank import main

    path = _write(_rows(dl19_rows, 10), tmp_path / "in.parquet")
    (tmp_path / "a-file").write_text("not a folder")
    for overrides, expected in [
        (["cache.uri=" + str(tmp_path / "a-file")], "is a file"),
        (["cache.uri=/proc/cache"], "cannot use cache.uri"),
        (
            ["tokenizer.long_documents=windows", "tokenizer.max_length=64"],
            "at least twice tokenizer.max_query_length (512)",
        ),
    ]:
        out = tmp_path / f"out-{len(expected)}"
        result = run_entry_point(
            main,
            "--input",
            path,
            "--output",
            out,
            "--model",
            "dummy:tiny",
            *[a for o in overrides for a in ("--set", o)],
        )
        assert (
            result.returncode == 2
            and result.stderr.startswith("error: ")
            and expected in result.stderr
        ), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
