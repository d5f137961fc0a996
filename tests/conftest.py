"""Fixtures shared by every test module: where the real data lives, an S3 server, a job's command line
run in this process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
