"""The rerank job's own files and settings, checked where they are read: a lease of any shape, a corrupt
summary/job record/manifest/marker, bad storage options, a full disk, a missing bucket, a finished output of
other settings, a run refused before any work, a folder holding another job's output. Each ends in one `error:`
line (or a logged take-over), leaves the output as the line says, and a run after the fix accounts for every row."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs.rerank import main as rerank_main
from pipeline.rerank.lease import LEASE_FILE, OutputLease

from .conftest import ROOT, read_dir

ROWS = 40  # two shards of 20 rows


@pytest.fixture
def tiny_input(dl19_rows, tmp_path) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:ROWS]), path, row_group_size=20)
    return path


def job_args(input_path, output, *extra) -> list[str]:
    return [
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=20",
        *extra,
    ]


def one_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The single `error:` line of a run that exited with `code`, holding every fragment; no traceback anywhere."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def completes(result: subprocess.CompletedProcess, output: Path, rows: int = ROWS) -> dict:
    """A finished run: exit 0, every input row ranked or rejected, nothing left of the run's machinery."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((output / "summary.json").read_text())
    ranked = read_dir(output / "ranked")
    rejected = read_dir(output / "rejected")
    assert summary["scored_rows"] + summary["rejected_rows"] == summary["input_rows"] == rows
    assert ranked.num_rows == summary["ranked_rows_written"]
    assert (rejected.num_rows if rejected is not None else 0) == summary["rejected_rows"]
    assert not (output / "_work").exists() and not (output / LEASE_FILE).exists()
    return summary


# -- leases of any shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"[1,2,3]",
        b'{"heartbeat": "yesterday"}',
        b"null",
        b"\x00\xffgarbage",
        b'{"run_id": "x", "user": "u", "host": "h", "pid": 0, "started": "s", "heartbeat": 1e400}',
    ],
)
def test_a_lease_that_is_not_a_lease_is_taken_over_and_logged(content, tmp_path, caplog):
    (tmp_path / LEASE_FILE).write_bytes(content)
    fs = fsspec.filesystem("file")
    with caplog.at_level(logging.WARNING, logger="rerank"):
        lease = OutputLease(fs, str(tmp_path), str(tmp_path), heartbeat_s=30).acquire()
    try:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == lease.run_id
        taken = [
            r.getMessage() for r in caplog.records if "taking over the lease" in r.getMessage()
        ]
        assert len(taken) == 1 and "not a lease, holding" in taken[0], taken
        assert repr(content.decode("utf-8", errors="replace"))[:40] in taken[0]
        assert "None@None" not in taken[0]
    finally:
        lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_heartbeat_from_a_clock_ahead_goes_stale_by_the_file_time(tmp_path, caplog):
    fs = fsspec.filesystem("file")
    path = tmp_path / LEASE_FILE
    ahead = {
        "run_id": "r1",
        "user": "u",
        "host": "elsewhere",
        "pid": 4242,
        "pid_start": None,
        "started": "s",
        "heartbeat": time.time() + 86_400,
    }
    path.write_text(
        json.dumps(ahead)
    )  # just written: its holder may be alive, whatever its clock says
    with pytest.raises(Exception) as refused:
        OutputLease(fs, str(tmp_path), str(tmp_path), timeout_s=60).acquire()
    assert "clock is 86" in str(refused.value) and "-86" not in str(refused.value), str(
        refused.value
    )

    os.utime(
        path, (time.time() - 61, time.time() - 61)
    )  # not rewritten for longer than the timeout
    with caplog.at_level(logging.WARNING, logger="rerank"):
        lease = OutputLease(fs, str(tmp_path), str(tmp_path), timeout_s=60).acquire()
    lease.release()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "clock is" in messages and "ahead" in messages and "no heartbeat for 61 s" in messages, (
        messages
    )
    assert not path.exists()


@pytest.mark.slow
def test_a_job_takes_over_a_garbage_lease(ray_local, tiny_input, tmp_path, run_entry_point):
    output = tmp_path / "out"
    output.mkdir()
    (output / LEASE_FILE).write_text("[1,2,3]")
    result = run_entry_point(rerank_main, *job_args(tiny_input, output))
    completes(result, output)
    assert "taking over the lease" in result.stderr and "'[1,2,3]'" in result.stderr


# -- the job's own files, corrupt -----------------------------------------------------------------------------


def _unfinished_output(tiny_input, output, run_entry_point, monkeypatch) -> None:
    """An output whose run scored and ranked everything and stopped just before its commit (as a kill there
    would): _work holds job.json, the manifests and the ranked buckets' markers."""
    import pipeline.rerank.job as job

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "commit", stop)
    result = run_entry_point(rerank_main, *job_args(tiny_input, output))
    assert result.returncode == 130, result.stderr[-2000:]
    monkeypatch.undo()
    assert (output / "_work" / "job.json").exists()


@pytest.mark.slow
def test_an_unfinished_runs_files_are_checked_where_read(
    ray_local, tiny_input, tmp_path, run_entry_point, monkeypatch
):
    output = tmp_path / "out"
    _unfinished_output(tiny_input, output, run_entry_point, monkeypatch)
    work = output / "_work"
    assert len(list((work / "manifests").glob("shard-*.json"))) == 2

    # Other settings over committed shards: refused naming the setting, the shards kept for the resume.
    one_error(
        run_entry_point(
            rerank_main, *job_args(tiny_input, output, "--set", "tokenizer.max_length=64")
        ),
        2,
        "unfinished run",
        "`tokenizer.max_length` 1024 there, 64 in this run",
        "2 shard(s) committed",
    )

    for name, content, fragments in [
        (
            "job.json",
            "{not json",
            ["is not valid JSON", f"delete {work} to start this output over"],
        ),
        (
            "job.json",
            '{"config_hash": 3}',
            ["not a valid record of an unfinished run", "`config_hash`"],
        ),
        (
            "manifests/shard-00001.json",
            '{"shard": 1, "pairs": "many", "files": []}',
            ["`pairs`", "delete it"],
        ),
        (
            "manifests/shard-00001.json",
            '{"shard": 0, "pairs": 1, "rejected": 0, "tokens": 3, "files": []}',
            ["for shard 0", "delete it"],
        ),
    ]:
        original = (work / name).read_bytes()
        (work / name).write_text(content)
        one_error(
            run_entry_point(rerank_main, *job_args(tiny_input, output)),
            2,
            str(work / name),
            *fragments,
        )
        assert (work / name).read_text() == content and not (output / "summary.json").exists()
        (work / name).write_bytes(original)

    # A scorer's record, read at the commit: refused there, before summary.json.
    record = sorted((work / "scorers").glob("*.json"))[0]
    original = record.read_bytes()
    record.write_text('{"dtype": 16}')
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output)),
        2,
        str(record),
        "not a valid scorer record",
    )
    assert not (output / "summary.json").exists()
    record.write_bytes(original)

    # A ranked bucket's marker, read after the (here empty) scoring phase: do what the line says, delete it.
    marker = work / "ranked" / "bucket-00000.json"
    marker.write_text("[]")
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output)),
        2,
        str(marker),
        "not a valid ranked bucket's marker",
        "delete it",
    )
    assert not (output / "summary.json").exists()
    marker.unlink()
    summary = completes(run_entry_point(rerank_main, *job_args(tiny_input, output)), output)
    assert summary["shards_resumed"] == 2


@pytest.mark.slow
def test_a_corrupt_summary_is_one_line_then_the_fix_completes(
    ray_local, tiny_input, tmp_path, run_entry_point
):
    output = tmp_path / "out"
    completes(run_entry_point(rerank_main, *job_args(tiny_input, output)), output)
    (output / "summary.json").write_text('{"input_rows": 40, "model": "dummy:tiny"}')
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output)),
        2,
        str(output / "summary.json"),
        "not a valid summary",
        "delete",
    )
    subprocess.run(["rm", "-r", str(output)], check=True)
    completes(run_entry_point(rerank_main, *job_args(tiny_input, output)), output)


# -- settings that differ, a refusal before any work -----------------------------------------------------------


@pytest.mark.slow
def test_a_finished_output_of_other_settings_names_them(
    ray_local, tiny_input, tmp_path, run_entry_point
):
    output = tmp_path / "out"
    first = completes(run_entry_point(rerank_main, *job_args(tiny_input, output)), output)
    assert first["settings"]["output"]["top_k"] is None
    line = one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output, "--set", "output.top_k=5")),
        2,
        "`output.top_k` None there, 5 in this run",
    )
    assert "model 'dummy:tiny'" not in line
    # A summary written before `settings` was recorded is compared through its whole (redacted) config.
    summary = json.loads((output / "summary.json").read_text())
    del summary["settings"]
    (output / "summary.json").write_text(json.dumps(summary))
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output, "--set", "output.top_k=5")),
        2,
        "`output.top_k` None there, 5 in this run",
    )
    assert json.loads((output / "summary.json").read_text()) == summary  # untouched
    completes(
        run_entry_point(
            rerank_main, *job_args(tiny_input, tmp_path / "other", "--set", "output.top_k=5")
        ),
        tmp_path / "other",
    )


@pytest.mark.slow
def test_a_run_refused_after_planning_does_not_block_a_corrected_rerun(
    ray_local, tiny_input, tmp_path, run_entry_point
):
    output = tmp_path / "out"
    gpu = job_args(
        tiny_input, output, "--config", str(ROOT / "configs" / "rerank_gpu_cluster.yaml")
    )
    one_error(run_entry_point(rerank_main, *gpu), 2, "no GPU")
    assert not (output / "summary.json").exists() and not (output / LEASE_FILE).exists()
    result = run_entry_point(rerank_main, *job_args(tiny_input, output))
    completes(result, output)
    assert "committed no shard; starting over" in result.stderr


# -- a folder holding someone else's files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries, fragment",
    [
        (
            ["stats.json", "candidates/part-00000.parquet", "rerank/summary.json"],
            "a hard-negatives output",
        ),
        (["metrics.json", "report.html"], "an index-quality output"),
        (["notes.txt"], "notes.txt"),
    ],
)
def test_an_output_folder_of_another_job_is_refused(
    entries, fragment, ray_local, tiny_input, tmp_path, run_entry_point
):
    output = tmp_path / "theirs"
    for entry in entries:
        (output / entry).parent.mkdir(parents=True, exist_ok=True)
        (output / entry).write_text("{}")
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, output)),
        2,
        str(output),
        fragment,
        "did not write",
    )
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before  # nothing added
    if entries == ["notes.txt"]:  # the fix: the folder emptied of what is not this job's
        (output / "notes.txt").unlink()
        completes(run_entry_point(rerank_main, *job_args(tiny_input, output)), output)


# -- storage options, buckets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("storage_options.client_kwargs=notadict", "client_kwargs"),
        ("storage_options.no_such_argument=1", "no_such_argument"),
    ],
    ids=["notadict", "unknown"],
)
def test_bad_s3_options_name_the_key(
    override, key, tiny_input, s3_bucket, run_entry_point, monkeypatch
):
    bucket, options = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    result = run_entry_point(rerank_main, *job_args(tiny_input, f"{bucket}/out", "--set", override))
    one_error(result, 2, f"`storage_options.{key}`", "fix or remove it")
    assert s3fs.S3FileSystem(**options).ls(bucket.removeprefix("s3://")) == []  # nothing written


@pytest.mark.slow
def test_unknown_storage_options_on_a_local_path_are_refused(
    ray_local, tiny_input, tmp_path, run_entry_point
):
    one_error(
        run_entry_point(
            rerank_main,
            *job_args(tiny_input, tmp_path / "out", "--set", "storage_options.endpoint=x"),
        ),
        2,
        "`storage_options.endpoint`",
        "not an argument of",
    )
    assert not (tmp_path / "out").exists()
    completes(
        run_entry_point(
            rerank_main,
            *job_args(tiny_input, tmp_path / "out", "--set", "storage_options.auto_mkdir=true"),
        ),
        tmp_path / "out",
    )


@pytest.mark.slow
def test_a_missing_bucket_is_refused_unless_asked_to_create_it(
    ray_local, tiny_input, s3_bucket, tmp_path, run_entry_point
):
    _, options = s3_bucket
    # The session's Ray workers started before this test's environment: the job gets its endpoint and keys
    # through storage_options, as on a cluster.
    storage = [a for k, v in options.items() for a in ("--set", f"storage_options.{k}={v}")]
    s3 = s3fs.S3FileSystem(**options)
    missing = "t-no-such-bucket-own-files"
    one_error(
        run_entry_point(rerank_main, *job_args(tiny_input, f"s3://{missing}/out", *storage)),
        2,
        f"s3://{missing}",
        "does not exist",
        "io.create_bucket=true",
    )
    one_error(
        run_entry_point(
            rerank_main,
            *job_args(
                tiny_input,
                tmp_path / "out",
                *storage,
                "--set",
                f"cache.uri=s3://{missing}-cache/scores",
            ),
        ),
        2,
        f"s3://{missing}-cache",
        "does not exist",
    )
    s3.invalidate_cache()
    assert (
        not s3.exists(missing)
        and not s3.exists(f"{missing}-cache")
        and not (tmp_path / "out").exists()
    )

    result = run_entry_point(
        rerank_main,
        *job_args(tiny_input, f"s3://{missing}/out", *storage, "--set", "io.create_bucket=true"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(s3.cat_file(f"{missing}/out/summary.json"))
    ranked = sum(
        pq.ParquetFile(s3.open(p)).metadata.num_rows
        for p in s3.glob(f"{missing}/out/ranked/*.parquet")
    )
    rejected = sum(
        pq.ParquetFile(s3.open(p)).metadata.num_rows
        for p in s3.glob(f"{missing}/out/rejected/*.parquet")
    )
    assert ranked + rejected == summary["input_rows"] == ROWS
    assert s3.ls(f"{missing}/out", detail=False) and not s3.exists(f"{missing}/out/_work")


# -- a full disk names its file ----------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A small RAM filesystem of our own (root can mount one here and in CI)."""
    mounted = []

    def mount(name: str, size_kb: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)], check=True
        )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fill(point: Path, leave_kb: int) -> Path:
    filler = point / "filler"
    stat = os.statvfs(point)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_kb * 1024))
    return filler


def test_disk_full_on_the_driver_names_the_file(tmpfs):
    from pipeline.core.faults import explain
    from pipeline.core.storage import write_json

    point = tmpfs("driver-full", 256)
    _fill(point, leave_kb=0)
    fs = fsspec.filesystem("file")
    with pytest.raises(OSError) as raised:
        write_json(fs, str(point / "summary.json"), {"x": "y" * 100_000})
    error = explain(raised.value)
    assert error is not None and error.exit_code == 3, raised.value
    assert str(point / "summary.json") in str(error) and "no space left" in str(error)
    assert sorted(p.name for p in point.iterdir()) == ["filler"]  # no temporary file left


@pytest.mark.slow
def test_disk_full_in_a_worker_names_the_file_then_a_rerun_completes(
    ray_local, dl19_rows, tmpfs, tmp_path, run_entry_point
):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:400]), source, row_group_size=200)
    point = tmpfs("worker-full", 2048)
    output = point / "out"
    filler = _fill(point, leave_kb=24)  # room for the lease and job.json, not for the scored rows
    # pairs cut at 64 tokens: the scored rows staged are the same size, their scores are not tested
    args = job_args(
        source, output, "--set", "input.rows_per_shard=200", "--set", "tokenizer.max_length=64"
    )
    line = one_error(run_entry_point(rerank_main, *args), 3, "no space left", "rerun")
    assert str(output / "_work" / "scored" / "shard-0000") in line, line
    assert not (output / "summary.json").exists()
    filler.unlink()
    completes(run_entry_point(rerank_main, *args), output, rows=400)
