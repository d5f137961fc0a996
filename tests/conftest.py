"""Fixtures shared by every test module: where the real data lives, the test worker's local Ray, an S3 server,
a job's command line run in this process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The test files that take longest (jobs in processes of their own, Ray clusters, end-to-end benchmarks), about
# slowest first. Each test worker runs one file at a time and takes the next waiting one when it is done
# (`--dist loadfile --no-loadscope-reorder`): the long files start first and the many short ones even out the
# end, instead of one long file starting last while the other worker idles. A file that `--durations` shows
# among the slowest belongs here; the order of the rest is the collection's.
SLOWEST_FIRST = [
    "rerank/test_faults.py",
    "rerank/test_cache.py",
    "rerank/test_reliability.py",
    "benchmark/test_benchmark_memory.py",
    "benchmark/test_benchmark_job.py",
    "datasets/test_eval_suite.py",
    "rerank/test_job.py",
    "rerank/test_own_files.py",
    "rerank/test_bad_rows.py",
    "cluster/test_gpu_cluster.py",
    "cluster/test_job_submit.py",
    "test_gpu_check.py",
    "test_readme.py",
    "hard_negatives/test_two_nodes.py",
    "runtime/test_console.py",
    "rerank/test_big_rows.py",
    "hard_negatives/test_job.py",
    "quality/test_job.py",
]


def pytest_collection_modifyitems(config, items):
    """The files of SLOWEST_FIRST first, in its order; each file's tests keep their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    tests = Path(__file__).resolve().parent

    def file_rank(item) -> int:
        try:
            return rank.get(item.path.relative_to(tests).as_posix(), len(rank))
        except ValueError:  # a test outside tests/
            return len(rank)

    items.sort(key=file_rank)  # stable


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (read-only; see its README): `$SHARED_DATA`, else `../shared/data` beside the
    project, else `.data/` where `python -m pipeline.datasets fetch` puts it. Without it every test that reads
    it fails with the one message naming that command (the check runs once, its failure is reused)."""
    from pipeline.core.errors import InputError
    from pipeline.datasets.fetch import locate

    try:
        return locate().resolve()
    except InputError as e:
        missing = str(e)
    pytest.fail(
        missing, pytrace=False
    )  # outside `except`: the message alone, not a chained second copy


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto in server mode) on 127.0.0.1, a random free port, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray per test worker (2 CPUs, like the CI machine), for every in-process job of every test
    folder: a job finds it started and runs on it, as under `ray job submit`. Ray's start-up (and its failure
    modes) is tested where a job starts its own, in a process of its own. Nothing else may shut it down: a test
    that did would make the next job of its worker start a Ray again."""
    import ray

    # address="local": a fresh Ray of this process, never a cluster another test started with `ray start`
    # (ray.init() with no address joins the one named in /tmp/ray/ray_current_cluster).
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


S3_KEY, S3_SECRET = "testing-key", "s3cr3t-never-logged"


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> tuple[str, dict]:
    """A fresh bucket: ("s3://<bucket>", storage_options for s3fs)."""
    import re

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": s3_endpoint, "key": S3_KEY, "secret": S3_SECRET}
    bucket = ("t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}", options


@pytest.fixture
def run_entry_point(capsys):
    """`run_entry_point(main, *argv)`: a job's `main` through the shared entry point (`pipeline.core.cli.run_main`),
    in this process, as `python -m jobs.X ARGV` runs it: its exit code, stdout and stderr as a
    `subprocess.CompletedProcess`. For what is decided before any work (bad arguments, config, input; exit codes
    and the one-line `error:`), where a process of its own adds only start-up time."""
    from pipeline.core.cli import run_main

    def run(main, *argv) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        capsys.readouterr()  # what earlier steps of the test printed is not this command's output
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, exit_info.value.code, out, err)

    return run
