"""Faults a user of the rerank job meets, each ending in one `error:` line, the right exit code and an output
that a rerun completes: a finished output with another input, pickle checkpoints, a garbage checkpoint, an
output that cannot be created, a full disk, an object store that goes away, two runs on one output, leaked
credentials under -v, a driver killed with its Ray left behind, progress that follows scoring."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs.rerank import main as rerank_main
from pipeline.core.cli import run_main
from pipeline.model.dummy import dummy_checkpoint

from .conftest import ROOT, read_dir, run_cli

pytestmark = pytest.mark.slow

JOB = ("jobs.rerank",)


def run_inline(capsys, *argv: str) -> tuple[int, str]:
    """The job's entry point in this process (its Ray is the session's): (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(rerank_main, list(argv))
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def accounted(output: Path) -> tuple[int, int, dict]:
    """(ranked rows, rejected rows, summary) of a finished output."""
    summary = json.loads((output / "summary.json").read_text())
    ranked = read_dir(output / "ranked")
    rejected = read_dir(output / "rejected")
    return ranked.num_rows, 0 if rejected is None else rejected.num_rows, summary


@pytest.fixture
def small_input(dl19_rows, tmp_path) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:150]), path, row_group_size=50)
    return path


# -- a finished output is never reported for another input -------------------------------------------------


def test_a_finished_output_with_another_input_is_refused_naming_both(
    ray_local, dl19_rows, tmp_path, capsys
):
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:50]), first)
    pq.write_table(pa.Table.from_pylist(dl19_rows[50:120]), second)
    output = tmp_path / "out"
    code, _ = run_inline(
        capsys, "--input", str(first), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["input_fingerprint"]["files"] == 1 and summary["input_uri"] == str(first)

    code, err = run_inline(
        capsys, "--input", str(second), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 2
    assert_one_error_line(err, "another input", str(first), str(second))
    assert json.loads((output / "summary.json").read_text()) == summary  # untouched

    # The same path rewritten with other rows is another input too (size and mtime from the listing).
    pq.write_table(pa.Table.from_pylist(dl19_rows[:60]), first)
    code, err = run_inline(
        capsys, "--input", str(first), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 2
    assert_one_error_line(err, "another input")

    # The unchanged input is "already complete", with the old counts, exit 0.
    pq.write_table(pa.Table.from_pylist(dl19_rows[:50]), tmp_path / "third.parquet")
    code, _ = run_inline(
        capsys,
        "--input",
        str(tmp_path / "third.parquet"),
        "--output",
        str(tmp_path / "out3"),
        "--model",
        "dummy:tiny",
    )
    code_again, err = run_inline(
        capsys,
        "--input",
        str(tmp_path / "third.parquet"),
        "--output",
        str(tmp_path / "out3"),
        "--model",
        "dummy:tiny",
    )
    assert code == code_again == 0 and "already complete" in err


# -- checkpoints -----------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_checkpoint(tmp_path: Path, trap: str | None = None) -> Path:
    import torch
    from safetensors.torch import load_file

    directory = tmp_path / "pickle-ckpt"
    shutil.copytree(dummy_checkpoint("tiny"), directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    if trap:
        with open(directory / "pytorch_model.bin", "wb") as f:
            pickle.dump({"weights": _Trap(trap)}, f)
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_a_pickle_checkpoint_is_refused_on_the_driver_without_unpickling(
    ray_local, small_input, tmp_path, capsys
):
    marker = tmp_path / "unpickled"
    model = _pickle_checkpoint(tmp_path, trap=str(marker))
    output = tmp_path / "out"
    code, err = run_inline(
        capsys, "--input", str(small_input), "--output", str(output), "--model", str(model)
    )
    assert code == 2
    assert_one_error_line(err, "pickle", "allow_pickle=true")
    assert not marker.exists()
    assert not (output / "_work").exists()  # refused before any work

    # With the opt-in the scorers (never the driver) read it as plain tensors only: the trap is refused there,
    # in one line, and torch's "weights_only=False" advice never reaches the user.
    code, err = run_inline(
        capsys,
        "--input",
        str(small_input),
        "--output",
        str(output),
        "--model",
        str(model),
        "--set",
        "allow_pickle=true",
    )
    assert code == 2, err[-3000:]
    line = assert_one_error_line(err, "pytorch_model.bin", "safetensors")
    assert "weights_only" not in err
    assert not marker.exists(), line


def test_allow_pickle_reaches_the_scorers(ray_local, small_input, tmp_path, capsys):
    model = _pickle_checkpoint(tmp_path)
    code, err = run_inline(
        capsys,
        "--input",
        str(small_input),
        "--output",
        str(tmp_path / "pickle"),
        "--model",
        str(model),
        "--set",
        "allow_pickle=true",
    )
    assert code == 0, err[-3000:]
    code, _ = run_inline(
        capsys,
        "--input",
        str(small_input),
        "--output",
        str(tmp_path / "safe"),
        "--model",
        "dummy:tiny",
    )
    assert code == 0
    pickled, safe = read_dir(tmp_path / "pickle" / "ranked"), read_dir(tmp_path / "safe" / "ranked")
    assert pickled.num_rows == safe.num_rows == 150
    # Same weights through the other loader: the same scores, up to float rounding of another batch packing.
    assert pickled.column("doc_id").to_pylist() == safe.column("doc_id").to_pylist()
    assert pickled.column("score").to_pylist() == pytest.approx(
        safe.column("score").to_pylist(), abs=1e-4
    )


def test_garbage_safetensors_is_one_line_before_work(small_input, tmp_path, capsys):
    model = tmp_path / "garbage"
    shutil.copytree(dummy_checkpoint("tiny"), model)
    (model / "model.safetensors").write_bytes(b"\xff" * 64 + b"not a safetensors header")
    output = tmp_path / "out"
    code, err = run_inline(
        capsys, "--input", str(small_input), "--output", str(output), "--model", str(model)
    )
    assert code == 2
    assert_one_error_line(err, "model.safetensors", "not a readable safetensors file")
    assert not (output / "_work").exists()


def test_a_bad_dtype_is_the_same_one_line_as_a_bad_config_value(capsys):
    code, err = run_inline(capsys, "--input", "x.parquet", "--output", "out", "--dtype", "int4")
    assert code == 2
    assert_one_error_line(err, "--dtype", "int4", "--help")
    assert "usage:" not in err


# -- the output location ---------------------------------------------------------------------------------


def test_an_output_that_cannot_be_created_is_one_line(small_input, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output, fragment in [
        (a_file / "out", "cannot create --output"),
        (a_file, "is a file"),
        (Path("/proc/rerank-output"), "cannot create --output"),
    ]:
        code, err = run_inline(
            capsys, "--input", str(small_input), "--output", str(output), "--model", "dummy:tiny"
        )
        assert code == 2, (output, err[-2000:])
        assert_one_error_line(err, fragment, str(output))


@pytest.fixture
def tmpfs(tmp_path):
    """A small RAM filesystem of our own (root can mount one here and in CI); yields (mount point, size)."""
    mounted = []

    def mount(name: str, size_kb: int, readonly: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size_kb}k" + (",ro" if readonly else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({result.stderr.strip()}); the disk-full paths are covered by "
                "test_faults_are_translated"
            )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_read_only_output_is_one_line(small_input, tmpfs, capsys):
    output = tmpfs("ro", 1024, readonly=True) / "out"
    code, err = run_inline(
        capsys, "--input", str(small_input), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 2
    assert_one_error_line(err, str(output))


# -- a full disk ------------------------------------------------------------------------------------------


def _fill(point: Path, leave_kb: int) -> Path:
    """Leave about `leave_kb` KB free on `point`'s filesystem."""
    filler = point / "filler"
    stat = os.statvfs(point)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_kb * 1024))
    return filler


def _no_partial_files(output: Path) -> None:
    left = [p for p in output.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left
    assert not (output / "summary.json").exists()


def test_disk_full_while_staging_then_a_rerun_completes(ray_local, dl19_1000, tmpfs, capsys):
    point = tmpfs("full-staging", 4096)
    output = point / "out"
    filler = _fill(point, leave_kb=24)  # room for the lease and job.json, not for the scored rows
    # pairs cut at 64 tokens: the scored rows staged are the same size, their scores are not tested
    args = ["--input", str(dl19_1000), "--output", str(output), "--model", "dummy:tiny"]
    args += ["--set", "tokenizer.max_length=64"]
    code, err = run_inline(capsys, *args)
    assert code == 3, err[-3000:]
    assert_one_error_line(err, "no space left", "rerun")
    _no_partial_files(output)

    filler.unlink()
    code, err = run_inline(capsys, *args)
    assert code == 0, err[-3000:]
    ranked, rejected, summary = accounted(output)
    assert ranked + rejected == summary["input_rows"] == 1000


def test_disk_full_in_the_final_copy_leaves_no_summary_and_resumes(
    ray_local, dl19_rows, tmp_path, tmpfs, capsys
):
    # 40 rows rejected for an empty query but carrying 100 KB documents: ~4 MB in staging, the same again when
    # the driver copies them to rejected/ at the end. 6 MB fit the first copy, not the second.
    import random

    rng = random.Random(0)
    rows = [dict(r) for r in dl19_rows[:400]]
    for r in rows[:40]:  # random hex: Parquet's compression cannot shrink it
        r["query"], r["document"] = "", rng.randbytes(50_000).hex()
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source, compression="none")
    point = tmpfs("full-final", 6 * 1024)
    output = point / "out"
    code, err = run_inline(
        capsys, "--input", str(source), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 3, err[-3000:]
    assert_one_error_line(err, "no space left")
    _no_partial_files(output)

    subprocess.run(["mount", "-o", "remount,size=16m", str(point)], check=True)
    code, err = run_inline(
        capsys, "--input", str(source), "--output", str(output), "--model", "dummy:tiny"
    )
    assert code == 0, err[-3000:]
    ranked, rejected, summary = accounted(output)
    assert (ranked, rejected) == (360, 40) and summary["input_rows"] == 400


def test_faults_are_translated():
    """The translation itself, for filesystems that cannot be filled here."""
    import errno

    from pipeline.core.errors import InfrastructureError, InputError, OutputError
    from pipeline.core.faults import explain

    full = explain(RuntimeError("task failed")) is None
    assert full
    wrapped = RuntimeError("ray task")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/data/out/part.parquet")
    error = explain(wrapped)
    assert (
        isinstance(error, InfrastructureError)
        and error.exit_code == 3
        and "/data/out/part.parquet" in str(error)
    )
    assert isinstance(
        explain(PermissionError(errno.EACCES, "Permission denied", "/x")), OutputError
    )
    assert isinstance(
        explain(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), InfrastructureError
    )
    inner = InputError("bad file x.parquet")
    outer = RuntimeError("wrapper")
    outer.cause = inner  # Ray's RayTaskError carries the worker's exception as `.cause`
    assert explain(outer) is inner


# -- the object store goes away --------------------------------------------------------------------------


def test_the_object_store_going_away_mid_run_then_a_rerun_resumes(
    ray_local, dl19_rows, tmp_path, capsys, monkeypatch
):
    from moto.server import ThreadedMotoServer

    import pipeline.rerank.job as job

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "k-fault",
        "secret": "s-fault-secret",
    }
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("faults")
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(dl19_rows[:600]), source, row_group_size=200)
    # The session's Ray workers started before this test: the job gets the endpoint and keys through
    # storage_options, as on a cluster.
    storage = [a for k, v in options.items() for a in ("--set", f"storage_options.{k}={v}")]
    args = [
        "--input",
        str(source),
        "--output",
        "s3://faults/out",
        "--model",
        "dummy:tiny",
        *storage,
    ]
    # pairs cut at 64 tokens: where the run stops and resumes is tested, not the scores
    args += ["--set", "input.rows_per_shard=200", "--set", "tokenizer.max_length=64"]

    # The endpoint goes away right after the first shard is committed (its manifest written): the other shards
    # are still being scored or written, or their manifests are still to be written.
    write_json, stopped = job.write_json, []

    def stop_after_the_first_manifest(fs_, path, record):
        write_json(fs_, path, record)
        if "/_work/manifests/shard-" in path and not stopped:
            server.stop()  # connections are refused from here on; the bucket's contents stay in this process
            stopped.append(path)

    monkeypatch.setattr(job, "write_json", stop_after_the_first_manifest)
    try:
        code, err = run_inline(
            capsys,
            *args,
            *("--set", "io.rows_per_write=100", "--set", "scorer.batch_size=100"),
            *("--set", "tokenizer.batch_size=100"),
            # botocore's retries of a refused connection (with backoff, on every request) only delay the error
            *("--set", "storage_options.config_kwargs.retries.max_attempts=1"),
        )
    finally:
        if not stopped:
            server.stop()
    monkeypatch.undo()
    assert stopped, "the run committed no shard"
    assert code == 3, err[-3000:]
    assert_one_error_line(err, "storage endpoint", "rerun")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        # The failed run could not release its lease (the endpoint was gone); its command has exited, as this
        # process has not: the lease names a process that has ended, which the rerun takes over at once.
        lease = json.loads(fs.cat("faults/out/_lease.json"))
        assert lease["pid"] == os.getpid()
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        fs.pipe("faults/out/_lease.json", json.dumps(lease | {"pid": ended.pid}).encode())
        code, err = run_inline(capsys, *args)
        assert code == 0, err[-3000:]
        fs.invalidate_cache()
        summary = json.loads(fs.cat("faults/out/summary.json"))
        assert summary["shards_resumed"] >= 1
        assert summary["scored_rows"] + summary["rejected_rows"] == 600
        ranked = pa.concat_tables(
            [pq.read_table(fs.open(p)) for p in fs.glob("faults/out/ranked/*.parquet")]
        )
        keys = list(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist()))
        assert len(keys) == len(set(keys)) == 600
    finally:
        server.stop()


# -- two runs on one output ------------------------------------------------------------------------------


def _lease_pid(output: Path) -> int | None:
    """The pid the output's lease names, once the lease is written (not only created)."""
    try:
        return json.loads((output / "_lease.json").read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_a_second_run_on_a_busy_output_is_refused_naming_the_owner(
    small_input, tmp_path, run_entry_point
):
    output = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        *JOB,
        "--input",
        str(small_input),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
        "--set",
        "scorer.batch_size=50",
        "--set",
        "io.rows_per_write=50",
        "--set",
        "tokenizer.max_length=64",
    ]
    first = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and _lease_pid(output) != first.pid:
            time.sleep(0.05)
        # The lease written, not only created: a run stopped between the two leaves an empty file, which the
        # second run takes over as "not a well-formed lease".
        assert _lease_pid(output) == first.pid, "the first run took no lease in 600 s"
        # Hold the first run still while the second tries: on a loaded machine it could otherwise finish before
        # the second reads the lease. A stopped process is alive, and the lease's 120 s heartbeat timeout is far.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            # Refused before any work (no Ray): the second run's command, in this process.
            second = run_entry_point(
                rerank_main, "--input", small_input, "--output", output, "--model", "dummy:tiny"
            )
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert_one_error_line(second.stderr, "being written by another run", f"pid {first.pid}")
    assert first.returncode == 0, err[-3000:]
    ranked, rejected, summary = accounted(output)
    assert ranked == summary["scored_rows"] == 150 and rejected == 0
    assert not (output / "_lease.json").exists()  # released at the end
    assert sorted(p.name for p in output.iterdir()) == ["ranked", "rejected", "summary.json"]


def test_the_lease_is_exclusive_and_a_dead_holder_is_taken_over(tmp_path):
    import fsspec

    from pipeline.core.errors import OutputError
    from pipeline.rerank.lease import LEASE_FILE, OutputLease

    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    holder = OutputLease(fs, root, root, heartbeat_s=0.2).acquire()
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        OutputLease(fs, root, root).acquire()

    # A holder on this machine whose process is gone is taken over at once...
    record = json.loads((tmp_path / LEASE_FILE).read_text())
    holder._stop.set()
    holder._thread.join()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LEASE_FILE).write_text(json.dumps(record | {"pid": dead.pid, "pid_start": None}))
    taker = OutputLease(fs, root, root, heartbeat_s=0.2).acquire()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == taker.run_id

    # ...and the old holder notices at its next heartbeat and refuses to go on.
    assert holder.beat() is False
    with pytest.raises(OutputError, match="another run took over"):
        holder.check()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == taker.run_id  # left alone

    # A holder on another machine is taken over only after the timeout without a heartbeat.
    taker.release()
    foreign = record | {"host": "elsewhere", "heartbeat": time.time() - 5}
    (tmp_path / LEASE_FILE).write_text(json.dumps(foreign))
    with pytest.raises(OutputError, match="elsewhere"):
        OutputLease(fs, root, root, timeout_s=60).acquire()
    (tmp_path / LEASE_FILE).write_text(json.dumps(foreign | {"heartbeat": time.time() - 61}))
    late = OutputLease(fs, root, root, timeout_s=60).acquire()
    late.release()
    assert not (tmp_path / LEASE_FILE).exists()


# -- secrets under -v ------------------------------------------------------------------------------------


def test_no_credential_in_the_logs_at_v(small_input, s3_bucket, s3_endpoint):
    _no_credential_in_the_logs(small_input, s3_bucket, s3_endpoint, "-v")


def test_no_credential_in_the_logs_at_vv(small_input, s3_bucket, s3_endpoint):
    _no_credential_in_the_logs(small_input, s3_bucket, s3_endpoint, "-vv")


def _no_credential_in_the_logs(small_input, s3_bucket, s3_endpoint, verbosity):
    bucket, options = s3_bucket
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run_cli(
        *JOB,
        verbosity,
        "--input",
        str(small_input),
        "--output",
        f"{bucket}/out",
        "--model",
        "dummy:tiny",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert options["key"] not in logs and options["secret"] not in logs
    assert "Signature=" not in logs.replace("Signature=<redacted>", "")
    debug_lines = [line for line in logs.splitlines() if " DEBUG " in line]
    assert debug_lines  # -v really is more verbose
    library = [line for line in debug_lines if "botocore" in line or "s3fs" in line]
    if verbosity == "-v":  # our debug lines only: botocore's stay at WARNING
        assert not library, library[:5]
    else:  # every library's, with the signatures and keys masked
        assert library and any("<redacted>" in line for line in library)


# -- a killed driver's Ray left behind -------------------------------------------------------------------


def _ray_sessions_of(pid: int) -> set[str]:
    """The Ray sessions process `pid` started (a session's name ends with its driver's pid): only those, so
    that Ray instances of other tests running beside this one are never touched."""
    out = subprocess.run(["pgrep", "-af", "gcs_server"], capture_output=True, text=True).stdout
    sessions = {
        part.split("=", 1)[1]
        for line in out.splitlines()
        for part in line.split()
        if part.startswith("--session-name=")
    }
    return {s for s in sessions if s.endswith(f"_{pid}")}


def test_a_rerun_is_not_confused_by_the_ray_a_killed_driver_left(dl19_1000, tmp_path):
    output = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        *JOB,
        "--input",
        str(dl19_1000),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=200",
        "--set",
        "tokenizer.max_length=64",
        "--set",
        "io.rows_per_write=100",
        "--set",
        "scorer.batch_size=100",
    ]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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
            "the run committed no shard in 600 s"
        )
        # The driver alone: whatever of its Ray outlives it (Ray ties its processes to the driver where the OS
        # lets it) must not confuse the rerun.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        result = run_cli(
            *JOB,
            "--input",
            str(dl19_1000),
            "--output",
            str(output),
            "--model",
            "dummy:tiny",
            "--set",
            "input.rows_per_shard=200",
            "--set",
            "tokenizer.max_length=64",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        ranked, rejected, summary = accounted(output)
        assert ranked == 1000 and summary["shards_resumed"] >= 1
        assert (
            "taking over the lease" in result.stderr
        )  # the killed driver's lease, taken over at once
    finally:
        for session in _ray_sessions_of(
            proc.pid
        ):  # what `ray stop` would do, for this test's Ray only
            subprocess.run(["pkill", "-9", "-f", session], capture_output=True)


# -- progress --------------------------------------------------------------------------------------------


def test_progress_follows_scoring_not_commits(ray_local, dl19_1000, tmp_path, capsys):
    # One shard and one staging write for the whole input: commits come only at the end, progress must not.
    code, err = run_inline(
        capsys,
        "--input",
        str(dl19_1000),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "dummy:tiny",
        "--set",
        "progress_interval_s=0.2",
        "--set",
        "scorer.batch_size=50",
    )
    assert code == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "INFO rerank: scored " in line]
    done = [int(line.split("scored ")[1].split("/")[0].replace(",", "")) for line in lines]
    assert len(done) >= 3, lines
    assert done == sorted(done) and done[0] < 1000 and done[-1] == 1000


# -- int8 where the scorers would be GPUs ---------------------------------------------------------------

INT8_ON_GPUS = """
import ray
from pipeline.core.config import load_config
from pipeline.core.errors import InputError
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.preflight import check_cluster

ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU as Ray counts it
for overrides in (["dtype=int8"], ["dtype=int8", "scorer.device=cuda"]):
    try:
        check_cluster(load_config(RerankConfig, None, overrides, model="dummy:tiny"), "")
        print("accepted", overrides)
    except InputError as e:
        print("refused:", e)
check_cluster(load_config(RerankConfig, None, ["dtype=int8", "scorer.device=cpu"], model="dummy:tiny"), "")
print("cpu scorers accepted")
"""


@pytest.mark.slow  # a Ray of its own, with a GPU it declares
def test_int8_is_refused_before_work_where_gpus_would_take_the_scorers():
    result = subprocess.run(
        [sys.executable, "-c", INT8_ON_GPUS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "refused",
        "refused",
        "cpu scorers accepted",
    ], lines
    assert "set scorer.device=cpu" in lines[0]


def test_float8_is_refused_before_work_where_the_scorers_run_on_cpu(
    ray_local, small_input, tmp_path, capsys
):
    code, err = run_inline(
        capsys,
        "--input",
        str(small_input),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "dummy:tiny",
        "--dtype",
        "float8",
    )
    assert code == 2
    assert_one_error_line(err, "dtype float8 runs on GPU scorers", "use dtype auto")
    assert not (tmp_path / "out" / "ranked").exists()
