"""A score cache with a file that does not read, or a wrong `_cache.json`: a rerank job skips the file, scores its
pairs again and moves it aside; the maintenance commands name it; a wrong `_cache.json` is one line naming the
file and the way back (`jobs.cache repair`, which reads the bucket count back from the entries)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rerank import cache as C
from tests.rerank.conftest import read_dir
from tests.rerank.test_cache import _entries, _keys, _publish_all, _rows, _same_ranking, _write


def _one_line_error(result, code: int = 2) -> str:
    """The command failed with `code` and exactly one `error:` line, no traceback anywhere."""
    assert result.returncode == code, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return errors[0]


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not parquet\xff" * 40)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _cache_main():
    from jobs.cache import main

    return main


def _filled_cache(root: Path, n: int = 300, buckets: int = 4) -> tuple[str, pa.Array]:
    """A fingerprint folder with `n` entries in `buckets` buckets, two part files each (two publications)."""
    spec = C.open_cache(str(root), {}, "a" * 32, {"test": True}, buckets)
    keys = _keys(n)
    _publish_all(spec.uri, keys.slice(0, n // 2), np.zeros(n // 2, np.float32), buckets)
    _publish_all(spec.uri, keys.slice(n // 2), np.ones(n - n // 2, np.float32), buckets)
    return spec.uri, keys


@pytest.mark.slow
def test_a_warm_run_over_a_corrupt_cache_file_quarantines_it_and_scores_its_pairs_again(
    ray_local, dl19_rows, tmp_path, run_entry_point
):
    from jobs.rerank import main as rerank

    cache = tmp_path / "cache"
    path = _write(_rows(dl19_rows, 200), tmp_path / "in.parquet")
    common = [
        "--input",
        path,
        "--model",
        "dummy:tiny",
        "--set",
        f"cache.uri={cache}",
        "--set",
        "cache.buckets=4",
    ]
    cold = run_entry_point(rerank, *common, "--output", tmp_path / "cold")
    assert cold.returncode == 0, cold.stderr
    parts = sorted(cache.glob("*/bucket-*/part-*.parquet"))
    assert len(parts) == 4
    garbled, truncated = parts[0], parts[2]
    lost = pq.read_table(garbled).num_rows + pq.read_table(truncated).num_rows
    _garble(garbled)
    _truncate(truncated)

    # The tools meant to inspect the cache name both files.
    verify = run_entry_point(_cache_main(), "verify", "--cache", cache)
    assert "2 of 4 score cache files" in _one_line_error(verify)
    named = [line for line in verify.stderr.splitlines() if line.startswith("unreadable: ")]
    assert len(named) == 2 and all(
        any(line.startswith(f"unreadable: {bad}: ") for line in named)
        for bad in (garbled, truncated)
    ), verify.stderr
    stats = run_entry_point(_cache_main(), "stats", "--cache", cache)
    assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr
    report = json.loads(stats.stdout)[0]
    assert sorted(u["path"] for u in report["unreadable_files"]) == sorted(
        [str(garbled), str(truncated)]
    )
    assert report["entries"] == 200 - lost and garbled.exists()  # stats only looks

    warm = run_entry_point(rerank, *common, "--output", tmp_path / "warm")
    assert warm.returncode == 0 and "Traceback" not in warm.stderr + warm.stdout, warm.stderr
    warnings = [
        line for line in warm.stderr.splitlines() if "WARNING" in line and "does not read" in line
    ]
    assert len(warnings) == 2 and all(
        any(str(bad) in w for w in warnings) for bad in (garbled, truncated)
    )
    quarantine = cache / garbled.parent.parent.name / "_quarantine"
    # Each bad file has left its path. A part file is named after its content, so the pairs scored again may be
    # published under the same name when the new scores have the same bits: then that path reads whole.
    for bad in (garbled, truncated):
        assert not bad.exists() or pq.read_table(bad).num_rows > 0
    assert (quarantine / garbled.parent.name / garbled.name).exists()
    assert (quarantine / truncated.parent.name / truncated.name).exists()
    summary = json.loads((tmp_path / "warm" / "summary.json").read_text())
    assert summary["cache"]["quarantined_files"] == 2
    assert sorted(summary["cache"]["quarantined"]) == sorted([str(garbled), str(truncated)])
    assert summary["pairs_scored"] == lost and summary["cache_hits"] == 200 - lost
    assert summary["scored_rows"] + summary["rejected_rows"] == 200
    _same_ranking(read_dir(tmp_path / "cold" / "ranked"), read_dir(tmp_path / "warm" / "ranked"))

    # The re-scored pairs are back in the cache (the next run finds every pair) and every file reads.
    verify = run_entry_point(_cache_main(), "verify", "--cache", cache)
    assert (
        verify.returncode == 0 and verify.stderr == "" and "read fully: all good" in verify.stdout
    ), verify.stderr
    assert _entries(cache) == 200 and summary["cache"]["entries_added"] == lost

    # An unparseable _cache.json stops the next run in one line naming it (was an unexpected JSONDecodeError).
    meta = next(cache.glob("*/_cache.json"))
    meta.write_text('{"format": 1, "buckets": ')
    broken = run_entry_point(rerank, *common, "--output", tmp_path / "broken")
    line = _one_line_error(broken)
    assert (
        str(meta) in line
        and "is not JSON" in line
        and f"python -m jobs.cache repair --cache {cache}" in line
    )
    assert (
        not (tmp_path / "broken" / "summary.json").exists()
        and meta.read_text() == '{"format": 1, "buckets": '
    )


def test_compact_and_prune_skip_a_file_that_does_not_read_report_it_and_move_it_aside(
    tmp_path, run_entry_point
):
    root, keys = _filled_cache(tmp_path)
    bad = sorted(Path(root).glob("bucket-00001/part-*.parquet"))[0]
    lost = pq.read_table(bad).num_rows
    _truncate(bad)
    result = run_entry_point(_cache_main(), "compact", "--cache", tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr + result.stdout, (
        result.stderr
    )
    report = json.loads(result.stdout)[0]
    moved = Path(root) / "_quarantine" / "bucket-00001" / bad.name
    assert report["unreadable_files"] == [
        {
            "path": str(bad),
            "reason": report["unreadable_files"][0]["reason"],
            "moved_to": str(moved),
        }
    ]
    assert (
        "magic bytes" in report["unreadable_files"][0]["reason"] and "<Buffer>" not in result.stdout
    )
    assert str(bad) in result.stderr and "WARNING" in result.stderr
    assert moved.exists() and not bad.exists() and report["entries"] == 300 - lost
    assert (
        len(list(Path(root).glob("bucket-*/*.parquet"))) == 4
    )  # the rest merged, one file per bucket
    assert sum(C.read_bucket(*_local(root), b).num_rows for b in range(4)) == 300 - lost

    garbled = sorted(Path(root).glob("bucket-00002/part-*.parquet"))[0]
    _garble(garbled)
    result = run_entry_point(_cache_main(), "prune", "--cache", tmp_path, "--older-than", "30d")
    assert result.returncode == 0 and "Traceback" not in result.stderr + result.stdout, (
        result.stderr
    )
    report = json.loads(result.stdout)[0]
    assert [u["path"] for u in report["unreadable_files"]] == [str(garbled)]
    assert (
        Path(root) / "_quarantine" / "bucket-00002" / garbled.name
    ).exists() and not garbled.exists()
    stats = json.loads(run_entry_point(_cache_main(), "stats", "--cache", tmp_path).stdout)[0]
    assert stats["unreadable_files"] == [] and stats["quarantined_files"] == 2
    verify = run_entry_point(_cache_main(), "verify", "--cache", tmp_path)
    assert verify.returncode == 0 and "3 files" in verify.stdout, (
        verify.stderr
    )  # buckets 0, 1 and 3 are left


def _local(root):
    import fsspec

    return fsspec.filesystem("file"), root


def test_a_reader_on_object_storage_quarantines_and_a_second_reader_finds_it_gone(
    s3_bucket, run_entry_point
):
    import s3fs

    uri, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    spec = C.open_cache(f"{uri}/cache", options, "b" * 32, {"test": True}, 2)
    _, root = spec.fs()
    keys = _keys(100)
    which = C.bucket_of_keys(keys, 2)
    for scores in (np.zeros(100, np.float32), np.ones(100, np.float32)):
        C.publish(
            fs,
            root,
            0,
            pa.table(
                {
                    C.KEY: keys.filter(pa.array(which == 0)),
                    C.SCORE: pa.array(scores[which == 0], pa.float32()),
                }
            ),
        )
    first, second = C.list_bucket(fs, root, 0)
    fs.pipe_file(first, fs.cat_file(first)[:100])  # truncated

    settings = [a for k, v in options.items() for a in ("--set", f"storage_options.{k}={v}")]
    verify = run_entry_point(_cache_main(), "verify", "--cache", f"{uri}/cache", *settings)
    assert f"s3://{first}" in verify.stderr and "1 of 2" in _one_line_error(verify)

    quarantined: list[dict] = []
    entries = C.read_bucket(fs, root, 0, quarantined=quarantined)
    assert entries.num_rows == int(
        (which == 0).sum()
    )  # the other file holds every key (the larger scores)
    assert quarantined == [
        {
            "path": first,
            "reason": quarantined[0]["reason"],
            "moved_to": f"{root}/_quarantine/bucket-00000/{first.rsplit('/', 1)[1]}",
        }
    ]
    assert fs.exists(quarantined[0]["moved_to"]) and not fs.exists(first)
    assert C.list_bucket(fs, root, 0) == [second]
    # A reader that listed before the move finds the file gone: nothing to move, no error.
    assert C.quarantine(fs, root, C.Unreadable(first, "truncated"))["moved_to"] is None

    verify = run_entry_point(_cache_main(), "verify", "--cache", f"{uri}/cache", *settings)
    assert (
        verify.returncode == 0 and "1 files" in verify.stdout and "Traceback" not in verify.stderr
    ), verify.stderr

    # Compaction on object storage leaves a file that does not read out of the merge and moves it aside too.
    fs.pipe_file(second, b"PAR1 and nothing else")
    compact = run_entry_point(_cache_main(), "compact", "--cache", f"{uri}/cache", *settings)
    assert compact.returncode == 0 and "Traceback" not in compact.stderr + compact.stdout, (
        compact.stderr
    )
    [unreadable] = json.loads(compact.stdout)[0]["unreadable_files"]
    assert unreadable["path"] == f"s3://{second}" and f"s3://{second}" in compact.stderr
    assert (
        unreadable["moved_to"] == f"s3://{root}/_quarantine/bucket-00000/{second.rsplit('/', 1)[1]}"
    )
    fs.invalidate_cache()
    assert fs.exists(unreadable["moved_to"][len("s3://") :]) and C.list_bucket(fs, root, 0) == []


def test_the_lookup_on_object_storage_records_what_it_moved_aside(s3_bucket, tmp_path):
    import s3fs

    from pipeline.rerank.stages.lookup import KEYS_SCHEMA, QUARANTINED, JoinBucket

    uri, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    spec = C.open_cache(f"{uri}/cache", options, "d" * 32, {"test": True}, 1)
    _, root = spec.fs()
    keys = _keys(40)
    C.publish(
        fs,
        root,
        0,
        pa.table({C.KEY: keys.slice(0, 20), C.SCORE: pa.array(np.zeros(20), pa.float32())}),
    )
    C.publish(
        fs, root, 0, pa.table({C.KEY: keys.slice(20), C.SCORE: pa.array(np.ones(20), pa.float32())})
    )
    bad = C.list_bucket(fs, root, 0)[0]
    lost = set(C.read_file(fs, bad, C.PART_SCHEMA).column(C.KEY).to_pylist())
    fs.pipe_file(bad, b"garbage")
    work = tmp_path / "work"
    (work / "lookup" / "shard-00000").mkdir(parents=True)  # made by the keys stage in a run
    run_keys = work / "lookup" / "keys.parquet"
    pq.write_table(
        pa.table([keys, pa.array(np.arange(40), pa.int64())], schema=KEYS_SCHEMA), run_keys
    )

    report = JoinBucket(spec, str(work / "lookup"), {})(
        pa.table({"bucket": [0], "files": [[str(run_keys)]]})
    )
    assert report.to_pylist() == [
        {
            "bucket": 0,
            "hits": 20,
            "same_texts": 0,
            "to_score": 20,
            "cache_entries": 20,
            "quarantined": 1,
        }
    ]
    found = pq.read_table(work / "lookup" / "shard-00000" / "found-00000.parquet")
    assert not lost & {
        keys[r].as_py() for r in found.column("_row").to_pylist()
    }  # the lost pairs are scored
    [record] = [json.loads(p.read_text()) for p in (work / QUARANTINED).glob("*.json")]
    assert (
        record["path"] == f"s3://{bad}"
        and "smaller than the minimum file footer" in record["reason"]
    )
    assert record["moved_to"] == f"s3://{root}/_quarantine/bucket-00000/{bad.rsplit('/', 1)[1]}"
    assert fs.cat_file(record["moved_to"][len("s3://") :]) == b"garbage" and not fs.exists(bad)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "is missing"),
        ("unparseable", "is not JSON"),
        ("zero buckets", "buckets: Input should be greater than 0"),
        ("buckets as text", "buckets: Input should be a valid integer"),
        ("too few buckets", "the folder holds bucket-00003"),
        ("unknown key", "bukets: Extra inputs are not permitted"),
        ("another fingerprint", "is not its folder's name"),
    ],
)
def test_a_wrong_cache_json_is_one_line_and_repair_reads_the_bucket_count_back(
    tmp_path, run_entry_point, case, expected
):
    root, keys = _filled_cache(tmp_path)
    meta_path = Path(root) / "_cache.json"
    good = json.loads(meta_path.read_text())
    broken = {
        "missing": None,
        "unparseable": '{"format": 1, "buckets": 4',
        "zero buckets": good | {"buckets": 0},
        "buckets as text": good | {"buckets": "4"},
        "too few buckets": good | {"buckets": 2},
        "unknown key": good | {"bukets": 4},
        "another fingerprint": good | {"fingerprint": "c" * 32},
    }[case]
    if broken is None:
        meta_path.unlink()
    else:
        meta_path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    for command in ("stats", "verify", "compact"):
        line = _one_line_error(run_entry_point(_cache_main(), command, "--cache", tmp_path))
        assert str(meta_path) in line and expected in line, line
        assert f"python -m jobs.cache repair --cache {tmp_path}" in line
    # A rerank job opening that folder stops the same way, before it writes anything to the cache.
    with pytest.raises(C.ConfigError, match="repair") as refused:
        C.open_cache(str(tmp_path), {}, "a" * 32, {"test": True}, 32)
    assert str(meta_path) in str(refused.value) and expected in str(refused.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing changed

    repair = run_entry_point(_cache_main(), "repair", "--cache", tmp_path)
    assert repair.returncode == 0 and "Traceback" not in repair.stderr, repair.stderr
    assert json.loads(repair.stdout)[0]["buckets"] == 4
    meta = C.CacheMeta.model_validate_json(meta_path.read_text())
    assert meta.buckets == 4 and meta.fingerprint == "a" * 32 and meta.repaired
    stats = run_entry_point(_cache_main(), "stats", "--cache", tmp_path)
    assert stats.returncode == 0 and json.loads(stats.stdout)[0]["entries"] == 300, stats.stderr
    # A second repair finds nothing wrong and leaves the file alone.
    again = run_entry_point(_cache_main(), "repair", "--cache", tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)[0]["problem"] is None
    assert C.CacheMeta.model_validate_json(meta_path.read_text()) == meta


def test_another_format_is_refused_and_not_repaired_and_too_few_keys_are_not_guessed(
    tmp_path, run_entry_point
):
    root, _ = _filled_cache(tmp_path / "a")
    meta_path = Path(root) / "_cache.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"format": 2}))
    for command in ("stats", "repair"):
        line = _one_line_error(run_entry_point(_cache_main(), command, "--cache", tmp_path / "a"))
        assert str(meta_path) in line and "another version of the cache (format 2" in line, line
    assert json.loads(meta_path.read_text())["format"] == 2

    root, _ = _filled_cache(tmp_path / "b", n=10)
    (Path(root) / "_cache.json").unlink()
    line = _one_line_error(run_entry_point(_cache_main(), "repair", "--cache", tmp_path / "b"))
    assert "too few to read the bucket count back" in line and f"delete {root}" in line
    assert not (Path(root) / "_cache.json").exists()


def test_a_second_compaction_is_told_to_wait_not_to_use_an_option_it_lacks(
    tmp_path, run_entry_point
):
    from pipeline.rerank.lease import OutputLease

    root, _ = _filled_cache(tmp_path)
    fs, _ = _local(root)
    with OutputLease(fs, root, root):
        line = _one_line_error(run_entry_point(_cache_main(), "compact", "--cache", tmp_path))
    assert "is being compacted or pruned by another run" in line and "wait for it to finish" in line
    assert "--output" not in line
    assert len(list(Path(root).glob("bucket-*/part-*.parquet"))) == 8  # nothing merged
